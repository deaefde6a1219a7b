//! Boot Loader Specification entries (`loader/entries/*.conf`, Fedora, RHEL and their kin):
//! `key value` lines; `linux` names the kernel, `options` (possibly several lines) its
//! arguments, which may refer to grubenv variables such as `$kernelopts`. GRUB's blscfg
//! reads `options` as GRUB script words, so they are split the same way here.

use super::grub::{self, Vars};

/// One entry, as far as a direct boot needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// The `linux` path (`/vmlinuz-6.5.0-1.fc39.x86_64`).
    pub linux: Option<String>,
    /// The `options` lines, joined, not yet split.
    pub options: String,
}

/// Parses an entry file. Unknown keys and malformed lines are ignored.
pub fn parse(text: &str) -> Entry {
    let mut e = Entry::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        match key {
            "linux" if !value.is_empty() => e.linux = Some(value.to_string()),
            "options" => {
                if !e.options.is_empty() {
                    e.options.push(' ');
                }
                e.options.push_str(value);
            }
            _ => {}
        }
    }
    e
}

impl Entry {
    /// Whether the entry boots kernel `vmlinuz-<version>`.
    pub fn boots(&self, version: &str) -> bool {
        self.linux
            .as_deref()
            .is_some_and(|l| grub::file_name(l) == format!("vmlinuz-{version}"))
    }

    /// The kernel arguments, variables resolved from `vars` (grubenv's).
    pub fn args(&self, vars: &Vars) -> Vec<String> {
        grub::words(&self.options, vars, true)
    }

    /// A rescue entry (`vmlinuz-0-rescue-<machine id>`): never the default choice.
    pub fn is_rescue(&self) -> bool {
        self.linux
            .as_deref()
            .is_some_and(|l| grub::file_name(l).starts_with("vmlinuz-0-rescue"))
    }
}

/// Of `entries` (file name, entry), the one for kernel `version`, else the newest non-rescue
/// one; with whether it was the kernel's own entry.
pub fn pick<'a>(
    entries: &'a [(String, Entry)],
    version: &str,
) -> Option<(&'a str, &'a Entry, bool)> {
    if let Some((name, e)) = entries.iter().find(|(_, e)| e.boots(version)) {
        return Some((name, e, true));
    }
    entries
        .iter()
        .filter(|(_, e)| e.linux.is_some() && !e.is_rescue())
        .max_by(|(_, a), (_, b)| {
            let ver = |e: &Entry| grub::file_name(e.linux.as_deref().unwrap_or("")).to_string();
            super::compare_versions(&ver(a), &ver(b))
        })
        .map(|(name, e)| (name.as_str(), e, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const FEDORA: &str = "title Fedora Linux (6.5.6-300.fc39.x86_64) 39 (Cloud Edition)
version 6.5.6-300.fc39.x86_64
linux /boot/vmlinuz-6.5.6-300.fc39.x86_64
initrd /boot/initramfs-6.5.6-300.fc39.x86_64.img
options root=UUID=4c3f ro rootflags=subvol=root no_timer_check net.ifnames=0 console=tty1 console=ttyS0,115200n8
grub_users $grub_users
grub_arg --unrestricted
grub_class fedora
";

    const RHEL8: &str = "title Red Hat Enterprise Linux (4.18.0-513.el8.x86_64) 8.9 (Ootpa)
version 4.18.0-513.el8.x86_64
linux /vmlinuz-4.18.0-513.el8.x86_64
initrd /initramfs-4.18.0-513.el8.x86_64.img $tuned_initrd
options $kernelopts $tuned_params
id rhel-20231003-4.18.0-513.el8.x86_64
grub_users $grub_users
grub_arg --unrestricted
grub_class kernel
";

    const RESCUE: &str = "title Rocky Linux (0-rescue-3e1b) 9.3
version 0-rescue-3e1b
linux /vmlinuz-0-rescue-3e1b
options root=/dev/mapper/rl-root ro rescue
";

    #[test]
    fn fedora_entry() {
        let e = parse(FEDORA);
        assert!(e.boots("6.5.6-300.fc39.x86_64"));
        assert!(!e.boots("6.5.6"));
        assert_eq!(
            e.args(&Vars::new()),
            v("root=UUID=4c3f ro rootflags=subvol=root no_timer_check \
               net.ifnames=0 console=tty1 console=ttyS0,115200n8")
        );
    }

    #[test]
    fn rhel_entry_takes_kernelopts_from_grubenv() {
        let env = grub::grubenv(
            "# GRUB Environment Block\nsaved_entry=rhel-20231003-4.18.0-513.el8.x86_64\n\
             kernelopts=root=/dev/mapper/rhel-root ro crashkernel=auto \
             resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap rhgb quiet \n\
             boot_success=0\n#######",
        );
        let e = parse(RHEL8);
        assert!(e.boots("4.18.0-513.el8.x86_64"));
        assert_eq!(
            e.args(&env),
            v(
                "root=/dev/mapper/rhel-root ro crashkernel=auto resume=/dev/mapper/rhel-swap \
               rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap rhgb quiet"
            )
        );
    }

    #[test]
    fn picks_the_kernels_entry_else_the_newest_non_rescue() {
        let entries = vec![
            ("a-0-rescue.conf".to_string(), parse(RESCUE)),
            ("b-4.18.conf".to_string(), parse(RHEL8)),
            (
                "c-4.18.0-477.conf".to_string(),
                parse("linux /vmlinuz-4.18.0-477.el8.x86_64\noptions old\n"),
            ),
            ("d-empty.conf".to_string(), parse("title nothing\n")),
        ];
        let (name, _, own) = pick(&entries, "4.18.0-477.el8.x86_64").unwrap();
        assert_eq!((name, own), ("c-4.18.0-477.conf", true));
        let (name, _, own) = pick(&entries, "5.14").unwrap();
        assert_eq!((name, own), ("b-4.18.conf", false));
        let (name, _, own) = pick(&entries, "0-rescue-3e1b").unwrap();
        assert_eq!((name, own), ("a-0-rescue.conf", true));
        assert!(pick(&entries[3..], "5.14").is_none());
    }

    #[test]
    fn several_options_lines_join() {
        let e = parse("options a b\n# options c\n options  d\noptions\n");
        assert_eq!(e.args(&Vars::new()), v("a b d"));
    }
}
