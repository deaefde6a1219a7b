//! Readiness: the local file systems the boot mounts are mounted.
//!
//! The agent's systemd unit starts it once the root is writable (after
//! systemd-remount-fs.service), not after local-fs.target: under an emulated CPU that target
//! comes seconds later, behind units the agent does not need (static device nodes, sysusers,
//! the random seed). What local-fs.target also stands for, every local file system being
//! mounted, the agent checks itself before it reports ready (`--ready-when-mounted`), so a
//! build step never writes into a directory a mount then covers.
//!
//! The mounts waited for are those local-fs.target requires: `/etc/fstab` entries that are
//! mounted at boot (not `noauto`, `nofail`, `_netdev`, automounts, swap or network file
//! systems), and `.mount` units enabled into local-fs.target (Debian trixie's tmpfs on /tmp),
//! unless masked or their mount point is a symlink (where systemd would not mount them).

use std::collections::BTreeSet;
use std::path::Path;

/// Network file system types (systemd's `fstype_is_network`): mounted after the network,
/// not by local-fs.target.
const NETWORK_FS: &[&str] = &[
    "afs",
    "ceph",
    "cifs",
    "smb3",
    "smbfs",
    "sshfs",
    "fuse.sshfs",
    "ncpfs",
    "ncp",
    "nfs",
    "nfs4",
    "gfs",
    "gfs2",
    "glusterfs",
    "fuse.glusterfs",
    "pvfs2",
    "ocfs2",
    "lustre",
    "davfs",
];

/// fstab options that take an entry out of local-fs.target's requirements.
const NOT_AT_BOOT: &[&str] = &["noauto", "nofail", "_netdev", "x-systemd.automount"];

/// Directories whose `local-fs.target.wants|requires` hold enabled mount units, most
/// specific first (systemd's unit search path).
const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "run/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

/// The mount points below `root` that the boot mounts but that are not mounted yet, sorted.
/// `root` is `/` in a guest (tests pass a fake tree with its own `proc/self/mountinfo`).
/// An unreadable fstab or unit directory expects nothing; an unreadable mount table is
/// taken as nothing mounted, so the agent waits rather than run too early.
pub fn pending(root: &Path) -> Vec<String> {
    let mut expected: BTreeSet<String> = BTreeSet::new();
    if let Ok(fstab) = std::fs::read_to_string(root.join("etc/fstab")) {
        expected.extend(fstab_mounts(&fstab));
    }
    expected.extend(unit_mounts(root));
    if expected.is_empty() {
        return Vec::new();
    }
    let mounted = std::fs::read_to_string(root.join("proc/self/mountinfo"))
        .map(|m| mounted_points(&m))
        .unwrap_or_default();
    expected
        .into_iter()
        .filter(|p| !mounted.contains(p))
        .collect()
}

/// Mount points of fstab entries that local-fs.target requires (the root excluded: it is
/// mounted before the agent can run at all).
fn fstab_mounts(fstab: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in fstab.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (point, fstype) = (unescape_octal(f[1]), f[2]);
        let opts = f.get(3).copied().unwrap_or("defaults");
        let off = opts.split(',').any(|o| NOT_AT_BOOT.contains(&o));
        let network = NETWORK_FS.contains(&fstype);
        if !point.starts_with('/') || point == "/" || fstype == "swap" || off || network {
            continue;
        }
        out.push(normalize(&point));
    }
    out
}

/// Mount points of `.mount` units enabled into local-fs.target, skipping masked units and
/// mount points that are symlinks.
fn unit_mounts(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in UNIT_DIRS {
        for kind in ["wants", "requires"] {
            let d = root.join(dir).join(format!("local-fs.target.{kind}"));
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(point) = mount_unit_path(&name) else {
                    continue;
                };
                let masked = UNIT_DIRS[..2].iter().any(|m| {
                    std::fs::read_link(root.join(m).join(&name))
                        .is_ok_and(|t| t == Path::new("/dev/null"))
                });
                let rel = point.trim_start_matches('/');
                let symlink = !rel.is_empty()
                    && std::fs::symlink_metadata(root.join(rel))
                        .is_ok_and(|m| m.file_type().is_symlink());
                if !masked && !symlink && point != "/" {
                    out.push(point);
                }
            }
        }
    }
    out
}

/// The mount point a `.mount` unit's name stands for (systemd-escape --unescape --path):
/// `var-lib.mount` is `/var/lib`, `-.mount` is `/`, `\x2d` is a `-`.
fn mount_unit_path(unit: &str) -> Option<String> {
    let body = unit.strip_suffix(".mount")?;
    if body == "-" {
        return Some("/".into());
    }
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(b'/');
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'-' => bytes.push(b'/'),
            b'\\' if b.get(i + 1) == Some(&b'x') => {
                let hex = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c => bytes.push(c),
        }
        i += 1;
    }
    String::from_utf8(bytes).ok()
}

/// The mount points in a `/proc/self/mountinfo` text (its fifth field).
fn mounted_points(mountinfo: &str) -> BTreeSet<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| normalize(&unescape_octal(p)))
        .collect()
}

/// fstab and mountinfo write a space as `\040`, a tab as `\011`, a backslash as `\134`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/srv/` and `/srv` are the same mount point.
fn normalize(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const FSTAB: &str = "\
# /etc/fstab: static file system information.
/dev/vda / ext4 defaults,x-systemd.growfs 0 1
UUID=1234 /boot/efi vfat umask=0077 0 1
/dev/vdb /srv/my\\040data ext4 defaults 0 2
/dev/vdc /data/ ext4 nofail 0 2
/dev/vdd /opt ext4 noauto 0 2
/swapfile none swap sw 0 0
server:/export /mnt/nfs nfs defaults 0 0
//host/share /mnt/smb cifs _netdev 0 0
/dev/vde /auto ext4 x-systemd.automount 0 0
tmpfs /run/scratch tmpfs
broken-line
";

    #[test]
    fn fstab_keeps_only_what_local_fs_target_requires() {
        assert_eq!(
            fstab_mounts(FSTAB),
            vec!["/boot/efi", "/srv/my data", "/run/scratch"]
        );
        assert!(fstab_mounts("").is_empty());
        assert!(fstab_mounts("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n").is_empty());
    }

    #[test]
    fn unit_names_unescape_to_paths() {
        assert_eq!(mount_unit_path("tmp.mount").as_deref(), Some("/tmp"));
        assert_eq!(mount_unit_path("-.mount").as_deref(), Some("/"));
        assert_eq!(
            mount_unit_path("var-lib.mount").as_deref(),
            Some("/var/lib")
        );
        assert_eq!(
            mount_unit_path("srv-my\\x2ddata.mount").as_deref(),
            Some("/srv/my-data")
        );
        assert_eq!(mount_unit_path("tmp.service"), None);
        // A cut-off or bad escape is no unit rather than a panic.
        assert_eq!(mount_unit_path("a\\x.mount"), None);
        assert_eq!(mount_unit_path("a\\xZZ.mount"), None);
        assert_eq!(mount_unit_path("a\\.mount").as_deref(), Some("/a\\"));
    }

    #[test]
    fn mountinfo_points_are_unescaped() {
        let mi = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
40 22 254:16 / /srv/my\\040data rw shared:9 - ext4 /dev/vdb rw
";
        let m = mounted_points(mi);
        assert!(m.contains("/") && m.contains("/dev") && m.contains("/srv/my data"));
        assert_eq!(m.len(), 3);
    }

    fn tree(fstab: &str, mountinfo: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::create_dir_all(d.path().join("proc/self")).unwrap();
        fs::write(d.path().join("etc/fstab"), fstab).unwrap();
        fs::write(d.path().join("proc/self/mountinfo"), mountinfo).unwrap();
        d
    }

    const ROOT_ONLY: &str = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";

    #[test]
    fn pending_lists_what_is_not_mounted_yet() {
        let d = tree(FSTAB, ROOT_ONLY);
        assert_eq!(
            pending(d.path()),
            vec!["/boot/efi", "/run/scratch", "/srv/my data"]
        );
        let all = format!(
            "{ROOT_ONLY}30 22 0:9 / /boot/efi rw - vfat /dev/vda1 rw\n\
             31 22 0:10 / /srv/my\\040data rw - ext4 /dev/vdb rw\n\
             32 22 0:11 / /run/scratch rw - tmpfs tmpfs rw\n"
        );
        fs::write(d.path().join("proc/self/mountinfo"), all).unwrap();
        assert!(pending(d.path()).is_empty());
        // No mount table to read: waiting is the safe answer.
        fs::remove_file(d.path().join("proc/self/mountinfo")).unwrap();
        assert_eq!(pending(d.path()).len(), 3);
    }

    #[test]
    fn a_bootstrap_root_is_ready_at_once() {
        let d = tree("/dev/vda / ext4 defaults,x-systemd.growfs 0 1\n", ROOT_ONLY);
        assert!(pending(d.path()).is_empty());
        // No fstab at all (some container-like roots).
        fs::remove_file(d.path().join("etc/fstab")).unwrap();
        assert!(pending(d.path()).is_empty());
    }

    #[test]
    fn enabled_mount_units_count_unless_masked_or_on_a_symlink() {
        use std::os::unix::fs::symlink;
        let d = tree("", ROOT_ONLY);
        let wants = d
            .path()
            .join("usr/lib/systemd/system/local-fs.target.wants");
        fs::create_dir_all(&wants).unwrap();
        symlink("../tmp.mount", wants.join("tmp.mount")).unwrap();
        symlink("../x.service", wants.join("x.service")).unwrap();
        fs::create_dir_all(d.path().join("tmp")).unwrap();
        assert_eq!(pending(d.path()), vec!["/tmp"]);
        // Mounted: ready.
        fs::write(
            d.path().join("proc/self/mountinfo"),
            format!("{ROOT_ONLY}33 22 0:12 / /tmp rw - tmpfs tmpfs rw\n"),
        )
        .unwrap();
        assert!(pending(d.path()).is_empty());
        fs::write(d.path().join("proc/self/mountinfo"), ROOT_ONLY).unwrap();
        // Masked in /etc: systemd will not mount it.
        let etc = d.path().join("etc/systemd/system");
        fs::create_dir_all(&etc).unwrap();
        symlink("/dev/null", etc.join("tmp.mount")).unwrap();
        assert!(pending(d.path()).is_empty());
        fs::remove_file(etc.join("tmp.mount")).unwrap();
        assert_eq!(pending(d.path()), vec!["/tmp"]);
        // /tmp a symlink (tmp.mount's ConditionPathIsSymbolicLink=!/tmp).
        fs::remove_dir(d.path().join("tmp")).unwrap();
        symlink("var/tmp", d.path().join("tmp")).unwrap();
        assert!(pending(d.path()).is_empty());
    }
}
