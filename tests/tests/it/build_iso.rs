//! `kiln build` of an ISO install's media: a `blank` disk, an ISO fetched over loopback HTTP and
//! attached as a CD-ROM, and a floppy made from `files`.
//!
//! The ISO (made by the test kit with grub-mkrescue) holds Debian's generic kernel and a busybox
//! initramfs, a tiny "installer": it mounts the CD (`/dev/sr0`) and the floppy (`/dev/fd0`),
//! prints a marker file of each to the serial console, writes a boot sector to the blank disk
//! and powers off. kiln then starts the VM again from its disk (first in the boot order, the CD
//! still attached): the boot sector prints its own marker and powers off too. No communicator
//! ever answers (the VM's `cloudInit` seed waits for a cloud-init the "installed" disk does not
//! have), so the build fails; the serial log it keeps shows each step, and that the second boot
//! came from the disk (the installer ran once).
//!
//! Failure tests: a wrong ISO checksum and an ISO URL nobody serves stop the build before any
//! VM boots, naming the VM, the URL and the problem.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use crate::build_common::*;
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::{package_kernel, GENERIC_METAPACKAGE};

const CD_MARKER: &str = "KILN-CD-MARKER-7f3a";
const FLOPPY_MARKER: &str = "kiln-floppy-answers-51c2";
const DISK_MARKER: &str = "KILN-DISK-BOOT";

/// 16-bit code SeaBIOS runs from the disk's first sector: prints [`DISK_MARKER`] on COM1, then
/// powers off through q35's ACPI PM1a control register (port 0x604, SLP_EN with S5 = 0).
fn boot_sector() -> Vec<u8> {
    let mut s = vec![
        0xFA, // cli
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBE, 0x1E, 0x7C, // mov si, 0x7c1e (the message)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xAC, // lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz +3
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp lodsb
        0xBA, 0x04, 0x06, // mov dx, 0x604
        0xB8, 0x00, 0x20, // mov ax, 0x2000
        0xEF, // out dx, ax
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
        0x90,
    ];
    assert_eq!(s.len(), 0x1E);
    s.extend_from_slice(format!("{DISK_MARKER}\r\n\0").as_bytes());
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// The installer's /init: the CD's and the floppy's markers to the console, the boot sector
/// onto the blank (virtio) disk, power off.
const INSTALLER: &str = r#"
echo kiln-installer: start
for i in $(seq 1 30); do
  [ -b /dev/sr0 ] && [ -b /dev/fd0 ] && [ -b /dev/vda ] && break
  sleep 1
done
mkdir -p /cd /fd
mount -t iso9660 -o ro /dev/sr0 /cd && cat /cd/marker.txt
mount -t vfat -o ro /dev/fd0 /fd && cat /fd/answers.txt
dd if=/cd/bootsector.bin of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null && echo kiln-installer: disk written
sync
poweroff -f
"#;

const GRUB_CFG: &str = "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\nmenuentry installer {\n  linux /boot/vmlinuz console=ttyS0 panic=-1\n  initrd /boot/initrd\n}\n";

/// The installer ISO, made once (cached by the kit); `Err` is the skip reason.
fn installer_iso(work: &Path) -> Result<PathBuf, String> {
    if let Some(why) = kiln_e2e::iso::cannot_build() {
        return Err(why);
    }
    let kernel =
        package_kernel(GENERIC_METAPACKAGE).map_err(|e| format!("Debian's generic kernel: {e}"))?;
    let initrd = work.join("initrd");
    let mut ir = Initramfs::new().busybox().kernel(&kernel);
    for m in [
        "ahci",
        "sr_mod",
        "isofs",
        "floppy",
        "vfat",
        "nls_cp437",
        "nls_ascii",
        "virtio_pci",
        "virtio_blk",
    ] {
        ir = ir.module(m);
    }
    ir.init_script(INSTALLER)
        .build(&initrd)
        .map_err(|e| format!("initramfs: {e}"))?;
    let marker = work.join("marker.txt");
    std::fs::write(&marker, format!("{CD_MARKER}\n")).unwrap();
    let sector = work.join("bootsector.bin");
    std::fs::write(&sector, boot_sector()).unwrap();
    kiln_e2e::iso::grub_iso(
        GRUB_CFG,
        &[
            ("boot/vmlinuz", &kernel.vmlinuz),
            ("boot/initrd", &initrd),
            ("marker.txt", &marker),
            ("bootsector.bin", &sector),
        ],
    )
    .map_err(|e| format!("grub-mkrescue: {e}"))
}

fn manifest(dir: &Path, name: &str, iso_url: &str, checksum: Option<&str>) -> String {
    let checksum = checksum
        .map(|c| format!("\n        checksum: sha256:{c}"))
        .unwrap_or_default();
    let body = format!(
        "files:\n  - name: answers.txt\n    inline: \"{FLOPPY_MARKER}\\n\"\nvms:\n  - name: installer\n    source: {{ blank: true }}\n    resources: {{ cpu: 1, memory: 1Gi }}\n    disks: [{{ name: root, size: 1Gi }}]\n    communicator: {{ sshTimeout: 90s }}\n    cloudInit: {{}}\n    isos:\n      - url: {iso_url}{checksum}\n    floppy:\n      files: [{{ name: answers.txt }}]\n"
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

fn build(kiln: &Path, m: &str, modules: &Path, cache: &Path) -> Output {
    run_kiln_with(
        kiln,
        &["build", m, "--output", modules.to_str().unwrap()],
        &[("KILN_CACHE", cache)],
    )
}

/// The failed build's kept serial log of VM `installer`.
fn kept_serial(modules: &Path) -> String {
    let logs = modules.join(".logs");
    let mut text = String::new();
    for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let p = e.path().join("installer-serial.log");
        if let Ok(t) = std::fs::read(&p) {
            text.push_str(&String::from_utf8_lossy(&t));
        }
    }
    text
}

#[test]
fn a_blank_vm_boots_its_iso_reads_the_floppy_and_then_boots_from_its_disk() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    if !on_path("qemu-system-x86_64") {
        kiln_e2e::skip("qemu-system-x86_64 is not installed");
        return;
    }
    if !Path::new("/usr/share/seabios/bios-256k.bin").is_file() {
        kiln_e2e::skip("SeaBIOS is not installed (Debian package seabios)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let iso = match installer_iso(tmp.path()) {
        Ok(iso) => iso,
        Err(why) => {
            kiln_e2e::skip(format!("cannot make the installer ISO: {why}"));
            return;
        }
    };
    let server = kiln_e2e::http::Server::file(iso);
    let url = format!("http://127.0.0.1:{}/installer.iso", server.port);
    // No checksum: kiln records the digest it computed.
    let m = manifest(tmp.path(), "iso-install", &url, None);
    let (modules, cache) = (tmp.path().join("modules"), tmp.path().join("cache"));
    let t = Instant::now();
    let out = build(&kiln, &m, &modules, &cache);
    let took = t.elapsed();
    eprintln!("build took {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // No communicator ever answers: the build fails once the disk's boot powered off.
    assert!(!out.status.success(), "{err}");
    assert!(!modules.join("iso-install").exists());
    assert!(
        err.contains("boot: firmware (bios): blank disk: install from ISO"),
        "{err}"
    );
    assert!(err.contains("fetching ISO"), "{err}");
    assert!(err.contains("starting it again, from its disk"), "{err}");
    assert!(
        err.contains("the VM stopped before its agent answered"),
        "{err}"
    );
    let serial = kept_serial(&modules);
    let at = |what: &str| {
        serial
            .find(what)
            .unwrap_or_else(|| panic!("`{what}` is not in the serial log:\n{serial}"))
    };
    let (cd, floppy, written, disk) = (
        at(CD_MARKER),
        at(FLOPPY_MARKER),
        at("kiln-installer: disk written"),
        at(DISK_MARKER),
    );
    assert!(
        cd < floppy && floppy < written && written < disk,
        "{serial}"
    );
    // The second boot came from the disk: the installer ran once.
    assert_eq!(
        serial.matches("kiln-installer: start").count(),
        1,
        "{serial}"
    );
    assert_eq!(server.hits(), 1, "the ISO is downloaded once");
    assert!(took.as_secs() < 120, "took {took:?}");
}

#[test]
fn a_wrong_iso_checksum_stops_the_build_before_anything_boots() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let server = kiln_e2e::http::Server::bytes(b"CD001 not the installer you wanted".to_vec());
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/installer.iso", server.port);
    let want = "ab".repeat(32);
    let m = manifest(tmp.path(), "iso-badsum", &url, Some(&want));
    let (modules, cache) = (tmp.path().join("modules"), tmp.path().join("cache"));
    let out = build(&kiln, &m, &modules, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("VM `installer`: ISO {url}: checksum mismatch")),
        "{err}"
    );
    assert!(
        err.contains(&want) && err.contains("nothing was booted"),
        "{err}"
    );
    assert!(!err.contains("Booting"), "nothing may boot: {err}");
    assert!(
        kept_serial(&modules).is_empty(),
        "no serial log: no QEMU ran"
    );
    assert!(!modules.join("iso-badsum").exists());
}

#[test]
fn an_iso_url_that_is_down_stops_the_build_before_anything_boots() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/installer.iso");
    let m = manifest(tmp.path(), "iso-down", &url, None);
    let (modules, cache) = (tmp.path().join("modules"), tmp.path().join("cache"));
    let out = build(&kiln, &m, &modules, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "VM `installer`: ISO {url}: cannot reach 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(err.contains("nothing was booted"), "{err}");
    assert!(!err.contains("Booting"), "nothing may boot: {err}");
    assert!(
        kept_serial(&modules).is_empty(),
        "no serial log: no QEMU ran"
    );
}

#[test]
fn isos_and_the_floppy_are_recorded_but_never_captured() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    // Any bytes serve as a CD here: the guest boots its own kernel directly and never reads it.
    let cd = b"CD001 a CD the guest does not read".repeat(64);
    let sum = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&cd)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let server = kiln_e2e::http::Server::bytes(cd);
    let url = format!("http://127.0.0.1:{}/tools.iso", server.port);
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("iso-kept.yaml");
    std::fs::write(
        &m,
        format!(
            "files:\n  - name: answers.txt\n    inline: \"{FLOPPY_MARKER}\\n\"\nvms:\n  - name: box\n    source:\n      bootstrap: {{ distro: debian, suite: bookworm, packages: [] }}\n    resources: {{ cpu: 1, memory: 1Gi }}\n    disks: [{{ name: root, size: 4Gi }}]\n    isos:\n      - url: {url}\n    floppy:\n      files: [{{ name: answers.txt }}]\n    provisioners:\n      - name: mark\n        type: shell\n        shell: {{ inline: \"echo built > /etc/kiln-iso-kept\" }}\n"
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    let t = Instant::now();
    let out = build_into(&kiln, &m, &modules);
    eprintln!("build took {:?}", t.elapsed());
    assert!(out.status.success(), "kiln build failed");
    let module = modules.join("iso-kept");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    // The ISO with the digest kiln computed (the manifest gave none).
    assert!(
        yaml.contains(&url) && yaml.contains(&format!("sha256: {sum}")),
        "{yaml}"
    );
    // Only the VM's own disk is captured: no CD, no floppy.
    let disks: Vec<String> = std::fs::read_dir(module.join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(disks, ["box-root.qcow2"], "{yaml}");
    assert_eq!(yaml.matches("file: disks/").count(), 1, "{yaml}");
    let stray = walk(&module)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.contains("floppy") || n.ends_with(".iso")
        })
        .collect::<Vec<_>>();
    assert!(stray.is_empty(), "{stray:?}");
    let built = read_guest_file(
        &module.join("disks/box-root.qcow2"),
        tmp.path(),
        "/etc/kiln-iso-kept",
    );
    assert_eq!(built.unwrap().trim(), "built");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
