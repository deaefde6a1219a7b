//! The image's own kernel arguments for the kernel kiln picked, read from its boot loader's
//! configuration on the file system holding that kernel: a BLS entry, else a `grub.cfg`
//! `linux` line, else Debian's `/etc/default/grub` on the root. Every file is untrusted: one
//! over [`MAX_CONFIG`] or unreadable is skipped with a warning, and the boot goes on with
//! kiln's own arguments.

use ext4_view::Ext4;

use super::{bls, grub, join};

/// Larger than any real boot loader configuration.
pub const MAX_CONFIG: u64 = 1 << 20;
/// BLS entries read at most (an image has one or two per installed kernel).
const MAX_ENTRIES: usize = 64;

/// Arguments found, with the file they came from (a path in the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArgs {
    pub args: Vec<String>,
    pub from: String,
}

/// The arguments for kernel `vmlinuz-<version>` in directory `dir` (`/boot`, or `/` on a
/// separate boot partition) of `boot`. `root` is the root file system when kiln found it (for
/// `/etc/default/grub`). In order: the kernel's own BLS entry, its own grub.cfg entry, the
/// grub.cfg default entry, the newest BLS entry, `/etc/default/grub`.
pub fn find(boot: &Ext4, dir: &str, root: Option<&Ext4>, version: &str) -> Option<ImageArgs> {
    let env = ["grub2/grubenv", "grub/grubenv"]
        .iter()
        .find_map(|f| read_config(boot, &join(dir, f)))
        .map(|t| grub::grubenv(&t))
        .unwrap_or_default();

    let entries_dir = join(dir, "loader/entries");
    let entries = bls_entries(boot, &entries_dir);
    let bls = bls::pick(&entries, version).map(|(name, e, own)| {
        let found = ImageArgs {
            args: e.args(&env),
            from: join(&entries_dir, name),
        };
        (found, own)
    });
    if let Some((found, true)) = bls {
        return Some(found);
    }

    let cfg = ["grub2/grub.cfg", "grub/grub.cfg"].iter().find_map(|f| {
        let path = join(dir, f);
        let (args, own) = grub::cfg_args(&read_config(boot, &path)?, &env, version)?;
        Some((ImageArgs { args, from: path }, own))
    });
    if let Some((found, true)) = cfg {
        return Some(found);
    }
    if let Some((found, _)) = cfg.or(bls) {
        return Some(found);
    }

    // /etc/default/grub is on the root: the one kiln found, else the kernel's own file system
    // when the kernel is in its /boot.
    let root = root.or((dir == "/boot").then_some(boot))?;
    default_grub(root)
}

/// `/etc/default/grub` and its `grub.d/*.cfg` drop-ins, sourced in name order.
fn default_grub(root: &Ext4) -> Option<ImageArgs> {
    const MAIN: &str = "/etc/default/grub";
    const DROPINS: &str = "/etc/default/grub.d";
    let mut texts: Vec<String> = read_config(root, MAIN).into_iter().collect();
    let mut from = vec![MAIN.to_string()];
    for name in conf_names(root, DROPINS, ".cfg") {
        let path = join(DROPINS, &name);
        if let Some(t) = read_config(root, &path) {
            texts.push(t);
            from.push(path);
        }
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let args = grub::default_grub_args(&refs)?;
    Some(ImageArgs {
        args,
        from: from.join(", "),
    })
}

/// The BLS entries of `dir`, by file name.
fn bls_entries(fs: &Ext4, dir: &str) -> Vec<(String, bls::Entry)> {
    conf_names(fs, dir, ".conf")
        .into_iter()
        .filter_map(|name| {
            let text = read_config(fs, &join(dir, &name))?;
            Some((name, bls::parse(&text)))
        })
        .collect()
}

/// The names in `dir` ending in `suffix`, sorted, at most [`MAX_ENTRIES`].
fn conf_names(fs: &Ext4, dir: &str, suffix: &str) -> Vec<String> {
    let Ok(rd) = fs.read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
        .filter(|n| n.ends_with(suffix) && !n.starts_with('.'))
        .collect();
    names.sort();
    if names.len() > MAX_ENTRIES {
        tracing::warn!(
            dir,
            count = names.len(),
            "only the first {MAX_ENTRIES} boot configuration files are read"
        );
        names.truncate(MAX_ENTRIES);
    }
    names
}

/// A configuration file's text: None when absent; when not a regular file, larger than
/// [`MAX_CONFIG`] or unreadable, None with a warning. Invalid UTF-8 is replaced.
fn read_config(fs: &Ext4, path: &str) -> Option<String> {
    if !fs.exists(path).unwrap_or(false) {
        return None;
    }
    let skip = |reason: String| {
        tracing::warn!(path, "boot configuration skipped: {reason}");
        None
    };
    let md = match fs.metadata(path) {
        Ok(m) => m,
        Err(e) => return skip(e.to_string()),
    };
    if !md.file_type().is_regular_file() {
        return skip("not a regular file".into());
    }
    if md.len() > MAX_CONFIG {
        return skip(format!(
            "{} bytes, more than the {MAX_CONFIG} kiln reads",
            md.len()
        ));
    }
    match fs.read(path) {
        Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Err(e) => skip(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::kargs;
    use super::*;
    use proptest::prelude::*;

    /// Text heavy in what the parsers treat specially, or plain random bytes.
    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(
                prop_oneof![
                    Just("linux ".to_string()),
                    Just("options ".to_string()),
                    Just("set ".to_string()),
                    Just("GRUB_CMDLINE_LINUX=".to_string()),
                    Just("root=".to_string()),
                    Just("vmlinuz-6.1".to_string()),
                    "[ \t\n'\"\\\\${}#=/()a-z0-9]{1,6}",
                    "\\PC{1,3}",
                ],
                0..40,
            )
            .prop_map(|p| p.concat()),
            prop::collection::vec(any::<u8>(), 0..512)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // Random configuration text never panics any parser, and what comes out can always
        // be written on a command line.
        #[test]
        fn hostile_configs_do_not_panic(text in hostile(), version in "[0-9.a-z-]{0,8}") {
            let env = grub::grubenv(&text);
            let entry = bls::parse(&text);
            let mut args = entry.args(&env);
            let _ = entry.boots(&version);
            let entries = vec![("x.conf".to_string(), entry)];
            let _ = bls::pick(&entries, &version);
            if let Some((a, _)) = grub::cfg_args(&text, &env, &version) {
                args.extend(a);
            }
            if let Some(a) = grub::default_grub_args(&[&text, &text]) {
                args.extend(a);
            }
            let root = kargs::choose_root(kargs::image_root(&args), None, "UUID=x");
            let own = vec![format!("root={root}"), "rw".to_string()];
            let line = kargs::render(&kargs::merge(&args, &own));
            prop_assert!(!line.chars().any(char::is_control), "{line:?}");
            prop_assert!(line.ends_with(" rw"), "{line:?}");
        }
    }
}
