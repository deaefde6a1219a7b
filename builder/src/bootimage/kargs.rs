//! Kernel arguments: an image's own, kept beside kiln's on a direct boot.
//!
//! An argument is held unquoted (`acpi_osi=Windows 2009`) and quoted again only when the
//! command line is written. What kiln sets itself wins: the image's `root=`, `ro`/`rw`,
//! `console=`, `panic=` and `systemd.hostname=` give way to kiln's (the root device was already
//! chosen by [`choose_root`]), and `BOOT_IMAGE=`/`initrd=` (boot loader bookkeeping) and
//! `quiet`/`rhgb`/`splash` (they hide the serial console output a build reads) are dropped.

/// Keys of the image's arguments that are never kept (before any `=`).
const DROPPED: &[&str] = &[
    "root",
    "ro",
    "rw",
    "console",
    "panic",
    "systemd.hostname",
    "BOOT_IMAGE",
    "initrd",
    "quiet",
    "rhgb",
    "splash",
];

/// More than any real image's arguments; past this they are ignored, not truncated: the kernel
/// itself cuts its command line at 2048 bytes, and kiln's own part must fit.
pub const MAX_ARGS_LEN: usize = 1024;

/// The key of an argument: what comes before the first `=`.
pub fn key(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

/// Whether an argument can be written on a kernel command line: not empty, no control
/// characters, and no `"` (the kernel's only quoting, which cannot be escaped).
fn writable(arg: &str) -> bool {
    !arg.trim().is_empty() && !arg.chars().any(|c| c.is_control() || c == '"')
}

/// The image's arguments kiln keeps, in their order: without what kiln sets or drops and
/// without what cannot be written. The last `root=` is the one the kernel would use.
pub fn kept(image: &[String]) -> Vec<String> {
    image
        .iter()
        .filter(|a| writable(a) && !DROPPED.contains(&key(a)))
        .cloned()
        .collect()
}

/// The image's `root=` value, as the kernel would take it (the last one); None when it has
/// none, or one no device name looks like (blanks, quotes, control characters).
pub fn image_root(image: &[String]) -> Option<&str> {
    image
        .iter()
        .rev()
        .find_map(|a| a.strip_prefix("root="))
        .filter(|r| writable(r) && !r.contains(char::is_whitespace))
}

/// Whether a `root=` value names the root the same way whatever bus its disk is on: a file
/// system or partition UUID or label, a device-mapper or LVM path, a `/dev/disk/by-*` link or
/// an md RAID. `/dev/sda1`, `/dev/vda1`, `/dev/nvme0n1p1`, `/dev/loop0p1` (grub-mkconfig run
/// against a loop device) or a `MAJ:MIN` number depend on how the disk is attached.
pub fn stable_root(root: &str) -> bool {
    const STABLE: &[&str] = &[
        "UUID=",
        "PARTUUID=",
        "LABEL=",
        "PARTLABEL=",
        "ZFS=",
        "/dev/mapper/",
        "/dev/disk/by-",
        "/dev/md",
    ];
    if STABLE.iter().any(|p| root.starts_with(p)) {
        return true;
    }
    // An LVM volume as /dev/<vg>/<lv>.
    root.strip_prefix("/dev/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(vg, lv)| !vg.is_empty() && !lv.is_empty() && !lv.contains('/'))
}

/// The root device for the command line. The image's own `root=` wins when it is stable (it
/// is the right one for LVM, btrfs subvolumes, XFS and any root kiln cannot read, and it
/// goes with the image's `rootflags=`); else the ext4 root kiln found (`UUID=`); else the
/// image's bus-dependent name; else `fallback` (the file system holding the kernel).
pub fn choose_root(image: Option<&str>, found: Option<&str>, fallback: &str) -> String {
    match (image, found) {
        (Some(i), _) if stable_root(i) => i.to_string(),
        (_, Some(f)) => f.to_string(),
        (Some(i), None) => i.to_string(),
        (None, None) => fallback.to_string(),
    }
}

/// The command line: the image's arguments kiln keeps (and whose key kiln's own do not set),
/// in their order, then kiln's own.
pub fn merge(image: &[String], own: &[String]) -> Vec<String> {
    let mut out: Vec<String> = kept(image)
        .into_iter()
        .filter(|a| !own.iter().any(|o| key(o) == key(a)))
        .collect();
    out.extend(own.iter().cloned());
    out
}

/// Writes arguments as one command line, quoting those with spaces the way the kernel reads
/// them (`key="a b"`).
pub fn render(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.chars().any(char::is_whitespace) {
                a.clone()
            } else if let Some((k, v)) = a.split_once('=') {
                format!("{k}=\"{v}\"")
            } else {
                format!("\"{a}\"")
            }
        })
        .collect();
    quoted.join(" ")
}

/// The kept arguments, or none when together they are longer than [`MAX_ARGS_LEN`].
pub fn bounded(args: Vec<String>) -> Result<Vec<String>, usize> {
    let len = render(&args).len();
    if len > MAX_ARGS_LEN {
        Err(len)
    } else {
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn kiln_settings_give_way_and_order_is_kept() {
        let image = v("BOOT_IMAGE=(hd0,gpt2)/vmlinuz-6.5.0-1 root=UUID=abc ro \
             rootflags=subvol=root rd.luks=0 console=tty0 console=ttyS0,115200 rhgb quiet \
             splash panic=10 systemd.hostname=x initrd=/initramfs.img net.ifnames=0");
        assert_eq!(
            kept(&image),
            v("rootflags=subvol=root rd.luks=0 net.ifnames=0")
        );
        let own = v("root=UUID=abc rw console=ttyS0 systemd.hostname=vm panic=-1 net.ifnames=1");
        assert_eq!(
            render(&merge(&image, &own)),
            "rootflags=subvol=root rd.luks=0 root=UUID=abc rw console=ttyS0 \
             systemd.hostname=vm panic=-1 net.ifnames=1"
        );
    }

    #[test]
    fn unwritable_args_are_dropped_and_spaces_quoted() {
        let image = vec![
            "acpi_osi=Windows 2009".to_string(),
            "bad\"quote".into(),
            "new\nline".into(),
            " ".into(),
            "two words".into(),
        ];
        assert_eq!(
            render(&merge(&image, &v("rw"))),
            "acpi_osi=\"Windows 2009\" \"two words\" rw"
        );
    }

    #[test]
    fn root_choice() {
        let found = Some("UUID=kiln");
        // LVM, btrfs, labels: the image's own.
        for r in [
            "/dev/mapper/rl-root",
            "/dev/rl/root",
            "UUID=abc",
            "LABEL=cloudimg-rootfs",
            "PARTUUID=1-2",
            "/dev/disk/by-uuid/abc",
            "/dev/md127",
        ] {
            assert_eq!(choose_root(Some(r), found, "UUID=boot"), r, "{r}");
        }
        // Bus-dependent names: kiln's when it found the root, else the image's.
        for r in [
            "/dev/sda1",
            "/dev/vda2",
            "/dev/nvme0n1p1",
            "/dev/loop0p1",
            "0801",
        ] {
            assert_eq!(choose_root(Some(r), found, "UUID=boot"), "UUID=kiln", "{r}");
            assert_eq!(choose_root(Some(r), None, "UUID=boot"), r, "{r}");
        }
        assert_eq!(choose_root(None, found, "UUID=boot"), "UUID=kiln");
        assert_eq!(choose_root(None, None, "UUID=boot"), "UUID=boot");
        assert_eq!(
            image_root(&v("root=/dev/sda1 ro root=UUID=x")),
            Some("UUID=x")
        );
        assert_eq!(image_root(&v("ro root= quiet")), None);
        assert_eq!(image_root(&["root=a b".to_string()]), None);
    }

    #[test]
    fn too_long_is_refused() {
        let long = vec!["x".repeat(MAX_ARGS_LEN + 1)];
        assert_eq!(bounded(long), Err(MAX_ARGS_LEN + 1));
        assert_eq!(bounded(v("a b")), Ok(v("a b")));
    }
}
