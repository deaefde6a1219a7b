//! GRUB's configuration as far as a direct boot needs it: the kernel arguments of a `linux`
//! line in `grub.cfg`, the variables of `grubenv` and `set` lines they refer to, and Debian's
//! `/etc/default/grub`. Pure functions over untrusted text: anything odd yields fewer
//! arguments, never a panic.

use std::collections::HashMap;

/// Variables a line's `$name` / `${name}` refer to.
pub type Vars = HashMap<String, String>;

/// The words of one line of GRUB script (or shell: the same quoting): `'...'` literal, `"..."`
/// with `$var` and `\` escapes, unquoted text split on blanks, `#` at a word's start ends
/// the line. An unquoted variable's value is split into words when `split_vars` (as GRUB
/// does, which is how BLS `options $kernelopts` becomes many arguments); unknown variables
/// are empty, as in GRUB.
pub fn words(line: &str, vars: &Vars, split_vars: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    // Whether `cur` is a word even if empty (`''`).
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        '$' => cur.push_str(&variable(&mut chars, vars)),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '$' => {
                let value = variable(&mut chars, vars);
                if !split_vars {
                    in_word = true;
                    cur.push_str(&value);
                    continue;
                }
                let mut parts = value.split_whitespace().peekable();
                while let Some(p) = parts.next() {
                    cur.push_str(p);
                    in_word = true;
                    if parts.peek().is_some() {
                        out.push(std::mem::take(&mut cur));
                    }
                }
                // A value ending in a blank ends the word.
                if value.ends_with(char::is_whitespace) && in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// After a `$`: `{name}` or a name of letters, digits and `_`; its value. A lone `$` is kept.
fn variable(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, vars: &Vars) -> String {
    let mut name = String::new();
    if chars.peek() == Some(&'{') {
        chars.next();
        for c in chars.by_ref() {
            if c == '}' {
                break;
            }
            name.push(c);
        }
    } else {
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if name.is_empty() {
            return "$".into();
        }
    }
    vars.get(&name).cloned().unwrap_or_default()
}

/// `grubenv`: `name=value` lines after the `# GRUB Environment Block` header, padded with
/// `#`; GRUB writes `\` before a `\` or newline in a value.
pub fn grubenv(text: &str) -> Vars {
    let mut vars = Vars::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let mut v = String::new();
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    v.push(n);
                }
            } else {
                v.push(c);
            }
        }
        vars.insert(name.trim().to_string(), v);
    }
    vars
}

/// Variables `set name=value` in a grub.cfg (RHEL's sets `kernelopts` there when grubenv has
/// none), in file order, on top of `base` (grubenv's win: GRUB loads them first and the
/// `set` runs only when they are missing, and kiln does not evaluate the `if`).
pub fn set_vars(cfg: &str, base: &Vars) -> Vars {
    let mut vars = base.clone();
    for line in cfg.lines() {
        let w = words(line, &vars, false);
        if w.first().map(String::as_str) != Some("set") {
            continue;
        }
        for a in &w[1..] {
            if let Some((name, value)) = a.split_once('=') {
                if !base.contains_key(name) {
                    vars.insert(name.to_string(), value.to_string());
                }
            }
        }
    }
    vars
}

/// A `linux` line: the kernel's path and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxLine {
    pub kernel: String,
    pub args: Vec<String>,
}

/// Every `linux`/`linuxefi`/`linux16` line of a grub.cfg, in file order (the first is the
/// default entry's on a config grub-mkconfig wrote).
pub fn linux_lines(cfg: &str, vars: &Vars) -> Vec<LinuxLine> {
    cfg.lines()
        .filter_map(|line| {
            let mut w = words(line, vars, true).into_iter();
            match w.next()?.as_str() {
                "linux" | "linuxefi" | "linux16" => {}
                _ => return None,
            }
            Some(LinuxLine {
                kernel: w.next()?,
                args: w.collect(),
            })
        })
        .collect()
}

/// The file name of a boot loader path (`(hd0,gpt2)/boot/vmlinuz-6.1` -> `vmlinuz-6.1`).
pub fn file_name(path: &str) -> &str {
    path.rsplit(['/', ')']).next().unwrap_or(path)
}

/// The arguments of the `linux` line for kernel `vmlinuz-<version>`, else of the first one
/// (the default entry); with whether it was the kernel's own entry.
pub fn cfg_args(cfg: &str, vars: &Vars, version: &str) -> Option<(Vec<String>, bool)> {
    let lines = linux_lines(cfg, &set_vars(cfg, vars));
    let want = format!("vmlinuz-{version}");
    if let Some(l) = lines.iter().find(|l| file_name(&l.kernel) == want) {
        return Some((l.args.clone(), true));
    }
    lines.into_iter().next().map(|l| (l.args, false))
}

/// Debian's `/etc/default/grub` (and its `grub.d/*.cfg`, given in the order the shell sources
/// them): `GRUB_CMDLINE_LINUX` then `GRUB_CMDLINE_LINUX_DEFAULT`, as grub-mkconfig puts them
/// on each entry's `linux` line. None when neither is set.
pub fn default_grub_args(files: &[&str]) -> Option<Vec<String>> {
    let mut vars = Vars::new();
    for text in files {
        for line in text.lines() {
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some((name, rest)) = line.split_once('=') else {
                continue;
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            // The value is one shell word; what follows it (`; ...`, a comment) is not.
            let value = words(rest, &vars, false).into_iter().next();
            vars.insert(name.to_string(), value.unwrap_or_default());
        }
    }
    let linux = vars.get("GRUB_CMDLINE_LINUX");
    let default = vars.get("GRUB_CMDLINE_LINUX_DEFAULT");
    if linux.is_none() && default.is_none() {
        return None;
    }
    Some(
        [linux, default]
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const DEBIAN_CFG: &str = r#"
#
# DO NOT EDIT THIS FILE
#
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
set default="0"
function load_video {
  insmod all_video
}
if [ x$feature_timeout_style = xy ] ; then
  set timeout_style=menu
  set timeout=0
fi
### BEGIN /etc/grub.d/10_linux ###
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-3f1e' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root 3f1e
	echo	'Loading Linux 6.1.0-28-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=6f2b ro  console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-3f1e' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-27-cloud-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-27-cloud-amd64-advanced-3f1e' {
		linux	/boot/vmlinuz-6.1.0-27-cloud-amd64 root=PARTUUID=6f2b ro  console=tty0 old=1
		initrd	/boot/initrd.img-6.1.0-27-cloud-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-27-cloud-amd64 (recovery mode)' {
		linux	/boot/vmlinuz-6.1.0-27-cloud-amd64 root=PARTUUID=6f2b ro single
	}
}
"#;

    #[test]
    fn debian_grub_cfg_entry_for_the_kernel() {
        let vars = Vars::new();
        let (args, own) = cfg_args(DEBIAN_CFG, &vars, "6.1.0-27-cloud-amd64").unwrap();
        assert!(own);
        assert_eq!(args, v("root=PARTUUID=6f2b ro console=tty0 old=1"));
        // A kernel with no entry of its own: the default (first) entry's.
        let (args, own) = cfg_args(DEBIAN_CFG, &vars, "6.9").unwrap();
        assert!(!own);
        assert_eq!(
            args,
            v("root=PARTUUID=6f2b ro console=tty0 console=ttyS0,115200 \
               earlyprintk=ttyS0,115200 consoleblank=0")
        );
        assert_eq!(cfg_args("set default=0\n", &vars, "6.1"), None);
    }

    #[test]
    fn ubuntu_grub_cfg_with_vt_handoff() {
        let cfg = r#"
if [ "${linux_gfx_mode}" != "text" ]; then load_video; fi
  set vt_handoff=vt.handoff=7
menuentry 'Ubuntu' --class ubuntu $menuentry_id_option 'gnulinux-simple-1a2b' {
	recordfail
	linux	/boot/vmlinuz-5.15.0-91-generic root=LABEL=cloudimg-rootfs ro  console=tty1 console=ttyS0 quiet splash $vt_handoff
	initrd	/boot/initrd.img-5.15.0-91-generic
}
"#;
        let (args, own) = cfg_args(cfg, &Vars::new(), "5.15.0-91-generic").unwrap();
        assert!(own);
        assert_eq!(
            args,
            v(
                "root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0 quiet splash \
               vt.handoff=7"
            )
        );
    }

    #[test]
    fn rhel_kernelopts_from_grub_cfg_unless_grubenv_has_them() {
        let cfg =
            "if [ -z \"${kernelopts}\" ]; then\n  set kernelopts=\"root=/dev/mapper/rhel-root ro \
                   rd.lvm.lv=rhel/root rhgb quiet \"\nfi\n\
                   linux16 /vmlinuz-3.10.0 $kernelopts extra\n";
        let (args, _) = cfg_args(cfg, &Vars::new(), "3.10.0").unwrap();
        assert_eq!(
            args,
            v("root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root rhgb quiet extra")
        );
        let env = grubenv("# GRUB Environment Block\nkernelopts=root=UUID=x ro\n####");
        let (args, _) = cfg_args(cfg, &env, "3.10.0").unwrap();
        assert_eq!(args, v("root=UUID=x ro extra"));
    }

    #[test]
    fn quoting() {
        let vars: Vars = [("v".to_string(), "a b".to_string())].into();
        assert_eq!(
            words(
                r#"linux '/a b' "x=$v" y=$v ${v}z \$v 'it''s' # c"#,
                &vars,
                true
            ),
            vec!["linux", "/a b", "x=a b", "y=a", "b", "a", "bz", "$v", "its"]
        );
        assert_eq!(words("x=$v", &vars, false), vec!["x=a b"]);
        assert_eq!(words("a '' $", &vars, true), vec!["a", "", "$"]);
        assert_eq!(file_name("(hd0,gpt2)/boot/vmlinuz-6.1"), "vmlinuz-6.1");
        assert_eq!(file_name("(hd0)vmlinuz-6.1"), "vmlinuz-6.1");
    }

    #[test]
    fn grubenv_values() {
        let env = grubenv(
            "# GRUB Environment Block\nsaved_entry=abc-6.5.0\nkernelopts=root=UUID=1 a\\\\b\n\
             boot_success=1\n##########",
        );
        assert_eq!(env["kernelopts"], "root=UUID=1 a\\b");
        assert_eq!(env["saved_entry"], "abc-6.5.0");
        assert_eq!(env.len(), 3);
    }

    #[test]
    fn debian_default_grub() {
        let main = "# If you change this file, run 'update-grub'\nGRUB_DEFAULT=0\nGRUB_TIMEOUT=5\n\
                    GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n\
                    GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"net.ifnames=0\"\n";
        let dropin = "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT console=tty1 \
                      console=ttyS0\" # cloud\n";
        assert_eq!(
            default_grub_args(&[main, dropin]).unwrap(),
            v("net.ifnames=0 quiet console=tty1 console=ttyS0")
        );
        assert_eq!(default_grub_args(&["GRUB_TIMEOUT=5\n"]), None);
    }
}
