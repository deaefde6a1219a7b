//! A foreign image's own kernel arguments on a direct boot: small ext4 images made with
//! `mkfs.ext4 -d` in the layouts of Fedora/RHEL (BLS entries, `initramfs-*.img`, grubenv's
//! `$kernelopts`, a separate /boot) and Debian (grub.cfg, `/etc/default/grub`); `find_boot`
//! finds the kernel, initrd and arguments, and the engines' command line keeps them beside
//! kiln's own.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kiln_builder::bootimage::{find_boot, BootInfo, RawImage};
use kiln_builder::engine::{BootMode, VmLaunch};
use kiln_builder::sources::BootFiles;

const FS_UUID: &str = "2d1c7a40-5b9e-4f0a-8c3d-1e2f3a4b5c6d";

/// Writes `files` (path, contents) under a temp tree, makes an ext4 image of it and runs
/// `find_boot`; None (with a SKIP line) when mkfs.ext4 is missing.
fn boot_of(files: &[(&str, &[u8])]) -> Option<BootInfo> {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    for (path, data) in files {
        let p = tree.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
    fs::create_dir_all(&tree).unwrap();
    let img = d.path().join("fs.raw");
    // Already there, so mkfs.ext4 does not announce that it creates it.
    File::create(&img).unwrap();
    if !mkfs(&tree, &img) {
        kiln_e2e::skip("mkfs.ext4 (e2fsprogs) is not installed");
        return None;
    }
    let f = File::open(&img).unwrap();
    Some(find_boot(Arc::new(RawImage(f))).unwrap())
}

fn mkfs(tree: &Path, img: &Path) -> bool {
    Command::new("mkfs.ext4")
        .args(["-q", "-F", "-U", FS_UUID, "-d"])
        .arg(tree)
        .arg(img)
        .arg("8M")
        .status()
        .is_ok_and(|s| s.success())
}

fn v(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The command line an engine passes for `boot`.
fn cmdline(boot: &BootInfo) -> String {
    let files = BootFiles {
        kernel: "/k".into(),
        initrd: None,
        root: boot.root.clone(),
        args: boot.args.clone(),
    };
    let vm = VmLaunch {
        name: "web".into(),
        cpus: 1,
        memory_mib: 256,
        boot: BootMode::Direct(files.clone()),
        cmdline_extra: vec![],
        disks: vec![],
        workdir: "/nonexistent".into(),
        serial_log: "/nonexistent/serial.log".into(),
        cid: 3,
        peripherals: Default::default(),
        nics: vec![],
    };
    vm.cmdline(&files)
}

const OS_RELEASE: (&str, &[u8]) = ("/etc/os-release", b"ID=fedora\n");

#[test]
fn fedora_bls_entry_on_a_btrfs_subvolume_root() {
    let Some(b) = boot_of(&[
        OS_RELEASE,
        ("/boot/vmlinuz-6.5.0-1", b"fedora kernel"),
        ("/boot/initramfs-6.5.0-1.img", b"fedora initramfs"),
        ("/boot/vmlinuz-0-rescue-3e1b", b"rescue kernel"),
        (
            "/boot/loader/entries/3e1b-6.5.0-1.conf",
            b"title Fedora Linux (6.5.0-1) 39\nversion 6.5.0-1\nlinux /boot/vmlinuz-6.5.0-1\n\
              initrd /boot/initramfs-6.5.0-1.img\n\
              options root=UUID=7a6b-btrfs ro rootflags=subvol=root rd.luks=0 quiet\n\
              grub_users $grub_users\n",
        ),
        (
            "/boot/loader/entries/3e1b-0-rescue.conf",
            b"linux /boot/vmlinuz-0-rescue-3e1b\noptions root=UUID=7a6b-btrfs ro rescue\n",
        ),
    ]) else {
        return;
    };
    assert_eq!(b.kernel, b"fedora kernel");
    assert_eq!(b.initrd.as_deref(), Some(&b"fedora initramfs"[..]));
    assert_eq!(b.kernel_version, "6.5.0-1");
    assert_eq!(b.args, v("rootflags=subvol=root rd.luks=0"));
    assert_eq!(
        b.args_from.as_deref(),
        Some("/boot/loader/entries/3e1b-6.5.0-1.conf")
    );
    // The image's own root (its btrfs), not the ext4 UUID kiln read the kernel from.
    assert_eq!(b.root, "UUID=7a6b-btrfs");
    assert_eq!(
        cmdline(&b),
        "rootflags=subvol=root rd.luks=0 root=UUID=7a6b-btrfs rw console=ttyS0 \
         systemd.hostname=web panic=-1"
    );
}

#[test]
fn rhel_separate_boot_with_kernelopts_and_an_lvm_root() {
    // The /boot file system alone: no os-release, entries at /loader/entries, grubenv in
    // /grub2.
    let Some(b) = boot_of(&[
        ("/vmlinuz-5.14.0-362.el9.x86_64", b"rhel kernel"),
        ("/initramfs-5.14.0-362.el9.x86_64.img", b"rhel initramfs"),
        (
            "/loader/entries/abc-5.14.0-362.el9.x86_64.conf",
            b"linux /vmlinuz-5.14.0-362.el9.x86_64\noptions $kernelopts $tuned_params\n",
        ),
        (
            "/grub2/grubenv",
            b"# GRUB Environment Block\nkernelopts=root=/dev/mapper/rl-root ro \
              resume=/dev/mapper/rl-swap rd.lvm.lv=rl/root rd.lvm.lv=rl/swap rhgb quiet \n\
              ################",
        ),
    ]) else {
        return;
    };
    assert_eq!(b.initrd.as_deref(), Some(&b"rhel initramfs"[..]));
    assert_eq!(b.root, "/dev/mapper/rl-root");
    assert_eq!(
        b.args,
        v("resume=/dev/mapper/rl-swap rd.lvm.lv=rl/root rd.lvm.lv=rl/swap")
    );
}

const DEBIAN_CFG: &[u8] = b"set default=\"0\"
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
\tinsmod ext2
\tlinux\t/boot/vmlinuz-6.1.0-28-cloud-amd64 root=/dev/vda1 ro  console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0
\tinitrd\t/boot/initrd.img-6.1.0-28-cloud-amd64
}
";

#[test]
fn debian_grub_cfg() {
    let Some(b) = boot_of(&[
        OS_RELEASE,
        ("/boot/vmlinuz-6.1.0-28-cloud-amd64", b"debian kernel"),
        ("/boot/initrd.img-6.1.0-28-cloud-amd64", b"debian initrd"),
        ("/boot/grub/grub.cfg", DEBIAN_CFG),
        (
            "/etc/default/grub",
            b"GRUB_CMDLINE_LINUX=\"not-this-one\"\n",
        ),
    ]) else {
        return;
    };
    assert_eq!(b.initrd.as_deref(), Some(&b"debian initrd"[..]));
    assert_eq!(b.args, v("earlyprintk=ttyS0,115200 consoleblank=0"));
    assert_eq!(b.args_from.as_deref(), Some("/boot/grub/grub.cfg"));
    // `/dev/vda1` depends on the disk's bus: kiln's file-system UUID names the root instead.
    assert_eq!(b.root, format!("UUID={FS_UUID}"));
    assert_eq!(
        cmdline(&b),
        format!(
            "earlyprintk=ttyS0,115200 consoleblank=0 root=UUID={FS_UUID} rw console=ttyS0 \
             systemd.hostname=web panic=-1"
        )
    );
}

#[test]
fn debian_default_grub_when_grub_cfg_is_too_large() {
    // A grub.cfg over 1 MiB is skipped (with a warning); /etc/default/grub is the fallback.
    let mut huge = DEBIAN_CFG.to_vec();
    huge.resize((1 << 20) + 1, b'#');
    let Some(b) = boot_of(&[
        OS_RELEASE,
        ("/boot/vmlinuz-6.1.0-28-cloud-amd64", b"debian kernel"),
        ("/boot/grub/grub.cfg", &huge),
        (
            "/etc/default/grub",
            b"GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
              GRUB_CMDLINE_LINUX=\"net.ifnames=0 biosdevname=0\"\n",
        ),
        (
            "/etc/default/grub.d/50-cloudimg-settings.cfg",
            b"GRUB_CMDLINE_LINUX_DEFAULT=\"console=tty1 console=ttyS0 nvme_core.io_timeout=4294967295\"\n",
        ),
    ]) else {
        return;
    };
    assert_eq!(b.initrd, None);
    assert_eq!(
        b.args,
        v("net.ifnames=0 biosdevname=0 nvme_core.io_timeout=4294967295")
    );
    assert_eq!(b.root, format!("UUID={FS_UUID}"));
}

#[test]
fn no_boot_configuration_keeps_kilns_own_line() {
    let Some(b) = boot_of(&[OS_RELEASE, ("/boot/vmlinuz-6.1.0-28-cloud-amd64", b"k")]) else {
        return;
    };
    assert!(b.args.is_empty());
    assert_eq!(b.args_from, None);
    assert_eq!(
        cmdline(&b),
        format!("root=UUID={FS_UUID} rw console=ttyS0 systemd.hostname=web panic=-1")
    );
}
