//! The captured `examples/hello.yaml` module boots outside kiln: its disk in plain
//! `qemu-system-x86_64` (TCG, no `-kernel`), once through SeaBIOS and once through OVMF, each
//! on its own overlay bigger than the module's disk, until systemd reaches multi-user; the
//! kernel booted is GRUB's `/vmlinuz` with the root by UUID, and the root partition and its
//! ext4 grew into the overlay's extra space on that first boot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::qemu::{Qemu, QemuConfig};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Firmware, GRUB, kernel and systemd under TCG on a shared 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// systemd's status line once the whole boot is done (root mounted and grown, units started).
const BOOTED: &str = "Multi-User System";
/// What each overlay adds to the module's disk.
const GROWTH: u64 = 2 << 30;

/// The virtual size of a disk image, from `qemu-img info`.
fn virtual_size(img: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info {}", img.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text
        .find("\"virtual-size\":")
        .expect("virtual-size in qemu-img info")
        + 15;
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number after virtual-size")
}

/// A qcow2 overlay over the module's disk (which is only ever read), `size` bytes.
fn overlay(base: &Path, at: &Path, size: u64) -> PathBuf {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(at)
        .arg(size.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create overlay");
    at.to_path_buf()
}

/// Boots `cfg` with `disk` as its only (virtio) disk until multi-user; the serial output.
fn boot(what: &str, cfg: QemuConfig, disk: &Path) -> String {
    let cfg = cfg.arg([
        "-drive".to_string(),
        format!("file={},format=qcow2,if=virtio", disk.display()),
    ]);
    let start = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    let line = vm
        .wait_for(BOOTED, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: booted in {:.1} s: {line}",
        start.elapsed().as_secs_f64()
    );
    vm.output()
}

/// Checks the boot went through GRUB's menu (not a direct kernel boot) and grew the root
/// past what the module's disk could hold.
fn assert_grub_booted_and_root_grew(what: &str, out: &str, base_size: u64) {
    let cmdline = out
        .lines()
        .find(|l| l.contains("Command line:"))
        .unwrap_or_else(|| panic!("{what}: no kernel command line in the log:\n{out}"));
    assert!(
        cmdline.contains("BOOT_IMAGE=/vmlinuz root=UUID="),
        "{what}: not GRUB's menu entry: {cmdline}"
    );
    // ext4 can grow only into its partition: more blocks than the whole module disk holds
    // means systemd-repart grew the partition and growfs the file system.
    let grown = out
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("resized filesystem to ")?;
            rest.trim().parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("{what}: the root file system did not grow:\n{out}"));
    eprintln!(
        "{what}: root grew to {grown} blocks ({} MiB; module disk {} MiB)",
        (grown * 4096) >> 20,
        base_size >> 20
    );
    assert!(
        grown * 4096 > base_size,
        "{what}: {grown} blocks is not more than the {base_size}-byte module disk"
    );
}

#[test]
fn hello_module_boots_in_plain_qemu_with_seabios_and_ovmf() {
    let test = "hello_module_boots_in_plain_qemu_with_seabios_and_ovmf";
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    if !on_path("qemu-img") {
        return kiln_e2e::skip(format_args!("{test}: qemu-img is missing (qemu-utils)"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let start = Instant::now();
    build_example(&kiln, "hello.yaml", &modules);
    eprintln!("{test}: built in {:.0} s", start.elapsed().as_secs_f64());
    let disk = modules.join("hello/disks/hello-root.qcow2");
    let base_size = virtual_size(&disk);
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.modified().unwrap())
    };
    let before = stamp(&disk);

    // SeaBIOS, QEMU's default firmware.
    let ovl = overlay(&disk, &tmp.path().join("bios.qcow2"), base_size + GROWTH);
    let cfg = QemuConfig::firmware(&tmp.path().join("bios-serial.log"));
    let out = boot("SeaBIOS", cfg, &ovl);
    assert!(
        !out.contains("efi: EFI v"),
        "SeaBIOS boot came up under UEFI?\n{out}"
    );
    assert_grub_booted_and_root_grew("SeaBIOS", &out, base_size);

    // OVMF, with its own copy of the variables.
    if !Path::new(OVMF_CODE).is_file() || !Path::new(OVMF_VARS).is_file() {
        kiln_e2e::skip(format_args!(
            "{test}: the OVMF half: {OVMF_CODE} or {OVMF_VARS} is missing (Debian package ovmf)"
        ));
    } else {
        let vars = tmp.path().join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).unwrap();
        let ovl = overlay(&disk, &tmp.path().join("uefi.qcow2"), base_size + GROWTH);
        let cfg = QemuConfig::firmware(&tmp.path().join("uefi-serial.log")).arg([
            "-drive".to_string(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".to_string(),
            format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
        let out = boot("OVMF", cfg, &ovl);
        assert!(out.contains("efi: EFI v"), "OVMF boot without UEFI?\n{out}");
        assert_grub_booted_and_root_grew("OVMF", &out, base_size);
    }

    // The module's disk was only read.
    assert_eq!(stamp(&disk), before, "the module's disk was written");
    qemu_img_check(&disk).unwrap();
}
