//! The firmware test images boot in plain QEMU (TCG, no `-kernel`): the UEFI one with OVMF,
//! the BIOS one with SeaBIOS, each to systemd's first target on the serial console.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_e2e::firmware_image;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Firmware, GRUB, kernel and systemd under TCG on a shared 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// systemd's status line once the whole boot is done (root mounted, units started).
const BOOTED: &str = "Multi-User System";

/// The image, or None (with a SKIP line) when this host cannot build or boot it.
fn image_or_skip(
    test: &str,
    build: fn() -> kiln_e2e::Result<std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    if !qemu_available() {
        skip(format_args!("{test}: qemu-system-x86_64 is not installed"));
        return None;
    }
    if let Some(why) = firmware_image::cannot_build() {
        skip(format_args!("{test}: {why}"));
        return None;
    }
    let start = Instant::now();
    let disk = build().unwrap_or_else(|e| panic!("{test}: building the image: {e}"));
    let again = Instant::now();
    let cached = build().unwrap();
    assert_eq!(cached, disk);
    eprintln!(
        "{test}: image {} in {:.1} s, cached lookup {:.3} s",
        disk.display(),
        (again - start).as_secs_f64(),
        again.elapsed().as_secs_f64()
    );
    Some(disk)
}

fn boot(cfg: QemuConfig, disk: &Path) -> String {
    let cfg = cfg.arg([
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio,snapshot=on", disk.display()),
    ]);
    let start = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    let line = vm
        .wait_for(BOOTED, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("booted in {:.1} s: {line}", start.elapsed().as_secs_f64());
    vm.output()
}

#[test]
fn uefi_xfs_image_boots_with_ovmf() {
    let test = "uefi_xfs_image_boots_with_ovmf";
    if !Path::new(OVMF_CODE).is_file() {
        return skip(format_args!(
            "{test}: {OVMF_CODE} is missing (Debian package ovmf)"
        ));
    }
    let Some(disk) = image_or_skip(test, firmware_image::uefi_xfs) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Each VM writes its own copy of the variables.
    let vars = dir.path().join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let cfg = QemuConfig::firmware(&dir.path().join("serial.log")).arg([
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
    ]);
    let out = boot(cfg, &disk);
    assert!(
        out.contains("EFI"),
        "no sign of UEFI in the boot log:\n{out}"
    );
}

#[test]
fn bios_btrfs_image_boots_with_seabios() {
    let test = "bios_btrfs_image_boots_with_seabios";
    let Some(disk) = image_or_skip(test, firmware_image::bios_btrfs) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = boot(QemuConfig::firmware(&dir.path().join("serial.log")), &disk);
    assert!(
        out.contains("btrfs") || out.contains("BTRFS"),
        "root not btrfs?\n{out}"
    );
}
