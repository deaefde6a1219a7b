//! The direct-boot initramfs of a bootstrap base: about 1.5 MB, uncompressed, instead of
//! Debian's `MODULES=most` one (15 MB of gzip, about 50 MB unpacked).
//!
//! Under TCG the distro initrd costs about 3.5 s of every boot: the kernel waits for its
//! unpacking, then initramfs-tools starts udev, coldplugs every device and loads drivers
//! for all of them before it mounts the root. kiln's direct boot knows its devices: this
//! one holds klibc's `sh`, `insmod`, `mount`, `fstype`, `chroot` and `run-init` (the root's
//! own `klibc-utils`, which initramfs-tools pulls in) and the disk drivers kiln's buses need
//! with their dependencies, from the root's own `/lib/modules`. Its `/init` loads them,
//! finds and mounts the root, runs the root's own udev just long enough to load the NIC
//! drivers and give the NICs their names (as the distro initramfs does: a NIC that is up can
//! no longer be renamed, and the agent configures it as soon as it starts), skips for this
//! boot the systemd generators that would find nothing to do in the root, and hands over to
//! systemd, whose udev loads everything else.
//!
//! Only kiln's direct boot uses it: the root keeps Debian's initrd for boots through GRUB
//! (firmware boot, the captured disk elsewhere). When something it needs is missing (no
//! klibc, compressed modules, a kernel without virtio_blk), the base falls back to the
//! distro initrd.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// Drivers loaded before the root is looked for, in this order, each after its
/// dependencies: the PCI transport (the qemu engine), the MMIO one (the kvm engine's
/// kiln-vmm, described by ACPI), the disk buses kiln offers (virtio-blk, virtio-scsi,
/// AHCI; absent ones are skipped), the root's file system (a module in Debian's generic
/// kernel, with the checksum it asks the crypto API for: no modprobe here to load it on
/// demand), and the vsock transport, so the agent can listen as soon as it starts. Built-in
/// ones need nothing. NIC drivers are udev's (see [`INIT`]).
const DRIVERS: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "crc32c_generic",
    "ext4",
    "vmw_vsock_virtio_transport",
];

/// Without these (loadable or built in) the root cannot be reached over virtio and mounted.
const REQUIRED: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// klibc programs `/init` runs, from `/usr/lib/klibc/bin`.
const TOOLS: &[&str] = &[
    "sh", "cat", "chroot", "insmod", "mount", "fstype", "sleep", "run-init", "mkdir", "ln",
];

/// Finds the root and starts the root's init. The root is `root=/dev/...` as given, or
/// else (`root=UUID=...`, as kiln passes it) the partition named `root` in its GPT, which
/// is the bootstrap layout's root partition: klibc has no blkid to read file-system UUIDs.
/// No root in 30 s or a failed mount ends `/init`: the kernel panics, and with kiln's
/// `panic=-1` the VM stops at once instead of hanging until the boot timeout.
const INIT: &str = r#"#!/bin/sh
# kiln's direct-boot initramfs (a bootstrap base's): load the disk drivers, mount the root,
# start its init.
PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod "/lib/modules/$m"; done
root=; mode=ro; init=/sbin/init; flags=
cmdline=$(cat /proc/cmdline)
for a in $cmdline; do
  case "$a" in
    root=*) root=${a#root=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
    init=*) init=${a#init=} ;;
    rootflags=*) flags=,${a#rootflags=} ;;
  esac
done
dev=; n=0
while :; do
  case "$root" in
    /dev/*) [ -b "$root" ] && dev=$root ;;
    *) for u in /sys/class/block/*/uevent; do
         [ -f "$u" ] || continue
         while read -r l; do
           if [ "$l" = PARTNAME=root ]; then d=${u%/uevent}; dev=/dev/${d##*/}; fi
         done < "$u"
         [ -n "$dev" ] && break
       done ;;
  esac
  [ -n "$dev" ] && break
  n=$((n + 1))
  if [ $n -gt 300 ]; then echo "kiln initramfs: no root device for root=$root"; exit 1; fi
  sleep 0.1
done
eval "$(fstype "$dev")"
mount -t "$FSTYPE" -o "$mode$flags" "$dev" /root || { echo "kiln initramfs: cannot mount $dev"; exit 1; }
mount -t tmpfs -o nodev,nosuid,mode=0755,size=10% tmpfs /run
for d in dev proc sys run; do mount -o move "/$d" "/root/$d"; done
# The root's udev names the NICs (loading their drivers) before anything can bring one up:
# a NIC that is up cannot be renamed, and the agent configures it as soon as it starts. It
# records the disks too (serials, /dev/disk/by-*), which a first step may already read.
if [ -x /root/bin/udevadm ]; then
  udev() { SYSTEMD_IGNORE_CHROOT=1 chroot /root "$@"; }
  udev /lib/systemd/systemd-udevd --daemon --resolve-names=never
  udev /bin/udevadm trigger --type=devices --action=add --subsystem-match=virtio \
    --subsystem-match=block
  udev /bin/udevadm trigger --type=devices --action=add --subsystem-match=pci \
    --attr-match=class=0x020000
  udev /bin/udevadm settle --timeout=10
  udev /bin/udevadm control --exit
fi
# Generators that would find nothing to do in this root are skipped for this boot only
# (links in /run, which systemd reads first; the image keeps them all for other boots):
# each is a program systemd starts, under an emulated CPU, before it starts any unit.
g=/root/run/systemd/system-generators
skip() { mkdir -p "$g" && ln -sf /dev/null "$g/systemd-$1-generator"; }
case "$cmdline" in *luks*) ;; *) [ -e /root/etc/crypttab ] || skip cryptsetup ;; esac
case "$cmdline" in *verity*|*roothash*|*usrhash*) ;; *) [ -e /root/etc/veritytab ] || skip veritysetup ;; esac
[ -e /root/etc/integritytab ] || skip integritysetup
[ -e /root/etc/rc.local ] || skip rc-local
case "$cmdline" in *systemd.mask*|*systemd.wants*|*debug*) ;; *) skip debug ;; esac
case "$cmdline" in *systemd.run*) ;; *) skip run ;; esac
# The SysV generator only makes units for init scripts that have no unit of their own.
sysv=
for s in /root/etc/init.d/*; do
  [ -f "$s" ] || continue
  n=${s##*/}; n=${n%.sh}
  for d in etc/systemd/system lib/systemd/system usr/lib/systemd/system; do
    if [ -e "/root/$d/$n.service" ] || [ -L "/root/$d/$n.service" ]; then continue 2; fi
  done
  sysv=1
done
[ -n "$sysv" ] || skip sysv
exec run-init /root "$init" "$@" </root/dev/console >/root/dev/console 2>&1
"#;

/// Why the minimal initramfs cannot be made for a root (the base then keeps the distro's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("no klibc in the root ({0} is missing)")]
    NoKlibc(String),
    #[error("module `{0}` is compressed (klibc's insmod loads plain .ko files)")]
    Compressed(String),
    #[error("the kernel has no `{0}`, built in or as a module")]
    NoDriver(String),
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// The initramfs (an uncompressed newc cpio: nothing to decompress under TCG) for kernel
/// `version` of `root`, and the modules it loads in order.
pub fn make(root: &Path, version: &str) -> Result<(Vec<u8>, Vec<String>), Unsupported> {
    let read = |p: &Path| {
        fs::read(p).map_err(|e| Unsupported::Read {
            path: p.to_path_buf(),
            reason: e.to_string(),
        })
    };
    let moddir = root.join("lib/modules").join(version);
    let dep = String::from_utf8_lossy(&read(&moddir.join("modules.dep"))?).into_owned();
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let order = load_order(&dep, &builtin)?;

    let klibc = root.join("usr/lib/klibc/bin");
    let interp = klibc_library(&root.join("usr/lib"))?;
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "proc",
        "run",
        "sys",
        "root",
    ] {
        cpio.dir(d);
    }
    // The console /init's output goes to before devtmpfs is mounted.
    cpio.node("dev/console", 0o020600, (5, 1));
    for t in TOOLS {
        let p = klibc.join(t);
        if !p.is_file() {
            return Err(Unsupported::NoKlibc(format!("/usr/lib/klibc/bin/{t}")));
        }
        cpio.file(&format!("bin/{t}"), 0o755, &read(&p)?);
    }
    // The programs' ELF interpreter is `/lib/klibc-<hash>.so`.
    let name = interp.file_name().unwrap_or_default().to_string_lossy();
    cpio.file(&format!("lib/{name}"), 0o755, &read(&interp)?);
    let mut names = Vec::new();
    for rel in &order {
        let file = module_name(rel) + ".ko";
        cpio.file(
            &format!("lib/modules/{file}"),
            0o644,
            &read(&moddir.join(rel))?,
        );
        names.push(file);
    }
    cpio.file(
        "modules",
        0o644,
        format!("{}\n", names.join(" ")).as_bytes(),
    );
    cpio.file("init", 0o755, INIT.as_bytes());
    Ok((cpio.finish(), names))
}

/// The one `klibc-*.so` in `usr_lib`.
fn klibc_library(usr_lib: &Path) -> Result<PathBuf, Unsupported> {
    let missing = || Unsupported::NoKlibc("/usr/lib/klibc-*.so".into());
    fs::read_dir(usr_lib)
        .map_err(|_| missing())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("klibc-") && n.ends_with(".so"))
        })
        .ok_or_else(missing)
}

/// `kernel/drivers/block/virtio_blk.ko` -> `virtio_blk` (module names use `_` for `-`).
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Module files (paths relative to the modules folder) to load for [`DRIVERS`], each after
/// its dependencies. modules.dep lists a module's dependencies transitively, each before
/// the ones it needs, so they load from its end.
fn load_order(modules_dep: &str, builtin: &str) -> Result<Vec<String>, Unsupported> {
    let deps: HashMap<String, (String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            let list = d.split_whitespace().map(str::to_string).collect();
            (module_name(m), (m.to_string(), list))
        })
        .collect();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut order: Vec<String> = Vec::new();
    for driver in DRIVERS {
        let Some((file, needs)) = deps.get(*driver) else {
            if REQUIRED.contains(driver) && !builtin.contains(*driver) {
                return Err(Unsupported::NoDriver(driver.to_string()));
            }
            continue;
        };
        for rel in needs.iter().rev().chain(std::iter::once(file)) {
            if !rel.ends_with(".ko") {
                return Err(Unsupported::Compressed(rel.clone()));
            }
            if !order.contains(rel) {
                order.push(rel.clone());
            }
        }
    }
    Ok(order)
}

/// A newc cpio archive being written ([`kiln_vmm::smoke::cpio_entry`]).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        kiln_vmm::smoke::cpio_entry(&mut self.out, self.ino, name, mode, rdev, data);
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, rdev, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        kiln_vmm::smoke::cpio_entry(&mut self.out, 0, "TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko
kernel/drivers/scsi/scsi_mod.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/jbd2/jbd2.ko:
";

    #[test]
    fn drivers_load_after_their_dependencies_once_each() {
        let order = load_order(DEP, "").unwrap();
        let names: Vec<String> = order.iter().map(|r| module_name(r)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_mmio",
                "virtio_blk",
                "scsi_mod",
                "sd_mod",
                "jbd2",
                "crc16",
                "ext4",
                "vsock",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn a_missing_disk_driver_falls_back_unless_built_in() {
        let no_blk: String = DEP
            .lines()
            .filter(|l| !l.contains("virtio_blk.ko:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            load_order(&no_blk, ""),
            Err(Unsupported::NoDriver("virtio_blk".into()))
        );
        assert!(load_order(&no_blk, "kernel/drivers/block/virtio_blk.ko\n").is_ok());
        let xz = DEP.replace("virtio_ring.ko", "virtio_ring.ko.xz");
        assert!(matches!(
            load_order(&xz, ""),
            Err(Unsupported::Compressed(_))
        ));
    }

    fn put(p: &Path, data: &[u8]) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    fn fake_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let m = r.join("lib/modules/6.1.0-1-cloud-amd64");
        put(&m.join("modules.dep"), DEP.as_bytes());
        for l in DEP.lines() {
            let (file, _) = l.split_once(':').unwrap();
            put(&m.join(file), format!("module {file}").as_bytes());
        }
        for t in TOOLS {
            put(&r.join("usr/lib/klibc/bin").join(t), t.as_bytes());
        }
        put(&r.join("usr/lib/klibc-abc.so"), b"klibc");
        d
    }

    /// The archive's entries (name, mode, data), read back as the kernel reads newc.
    fn entries(img: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&img[at..at + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&img[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name_at = at + 110;
            let name = String::from_utf8(img[name_at..name_at + namesize - 1].to_vec()).unwrap();
            let data_at = (name_at + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode as u32, img[data_at..data_at + size].to_vec()));
            at = (data_at + size).next_multiple_of(4);
        }
    }

    #[test]
    fn the_archive_holds_init_tools_klibc_and_modules_in_order() {
        let root = fake_root();
        let (img, names) = make(root.path(), "6.1.0-1-cloud-amd64").unwrap();
        let e = entries(&img);
        let get = |n: &str| e.iter().find(|(name, _, _)| name == n).cloned();
        let (_, mode, init) = get("init").unwrap();
        assert_eq!(mode, 0o100755);
        assert!(init.starts_with(b"#!/bin/sh\n"));
        assert_eq!(get("dev/console").unwrap().1, 0o020600);
        assert_eq!(get("bin/run-init").unwrap().2, b"run-init");
        assert_eq!(get("lib/klibc-abc.so").unwrap().2, b"klibc");
        assert_eq!(
            get("lib/modules/virtio_blk.ko").unwrap().2,
            b"module kernel/drivers/block/virtio_blk.ko"
        );
        let listed = String::from_utf8(get("modules").unwrap().2).unwrap();
        assert_eq!(listed.trim(), names.join(" "));
        assert!(listed.starts_with("virtio_ring.ko virtio.ko "), "{listed}");
    }

    /// `/init`'s generator part, run by the host's shell against a fake root: a generator is
    /// skipped only when it would find nothing to do.
    fn skipped_generators(root: &Path, cmdline: &str) -> Vec<String> {
        let start = INIT.find("# Generators that would").unwrap();
        let end = INIT.find("exec run-init").unwrap();
        let script = format!(
            "cmdline='{cmdline}'\n{}",
            INIT[start..end].replace("/root/", &format!("{}/", root.display()))
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = root.join("run/systemd/system-generators");
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map(|d| {
                d.map(|e| {
                    let e = e.unwrap();
                    assert_eq!(fs::read_link(e.path()).unwrap(), Path::new("/dev/null"));
                    e.file_name().to_string_lossy().into_owned()
                })
                .collect()
            })
            .unwrap_or_default();
        names.sort();
        let _ = fs::remove_dir_all(root.join("run/systemd"));
        names
    }

    #[test]
    fn generators_with_nothing_to_do_are_skipped_for_the_boot() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        put(&r.join("etc/init.d/udev"), b"#!/bin/sh");
        put(&r.join("etc/init.d/hwclock.sh"), b"#!/bin/sh");
        put(&r.join("lib/systemd/system/udev.service"), b"");
        std::os::unix::fs::symlink("/dev/null", r.join("lib/systemd/system/hwclock.service"))
            .unwrap();
        fs::create_dir_all(r.join("run")).unwrap();
        let all = [
            "cryptsetup",
            "debug",
            "integritysetup",
            "rc-local",
            "run",
            "sysv",
            "veritysetup",
        ]
        .map(|g| format!("systemd-{g}-generator"));
        let plain = "root=UUID=x rw console=ttyS0 panic=-1";
        assert_eq!(skipped_generators(r, plain), all);
        // Each one runs again once it has something to do.
        put(&r.join("etc/init.d/legacy"), b"#!/bin/sh");
        put(&r.join("etc/rc.local"), b"#!/bin/sh");
        put(&r.join("etc/crypttab"), b"");
        let left = skipped_generators(r, &format!("{plain} systemd.debug_shell systemd.run=true"));
        assert_eq!(
            left,
            ["integritysetup", "veritysetup"].map(|g| format!("systemd-{g}-generator"))
        );
    }

    #[test]
    fn no_klibc_no_minimal_initramfs() {
        let root = fake_root();
        fs::remove_file(root.path().join("usr/lib/klibc/bin/run-init")).unwrap();
        assert!(matches!(
            make(root.path(), "6.1.0-1-cloud-amd64"),
            Err(Unsupported::NoKlibc(_))
        ));
    }
}
