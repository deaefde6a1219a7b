//! The firmware test images in plain QEMU (TCG, no `-kernel`): what each firmware prints when
//! it cannot boot (the unsigned image under Secure Boot, a disk with no boot loader) and the
//! kernel's word on Secure Boot without keys: the texts a build watches for. That the good
//! images boot is shown by the builds of them (build_firmware, build_secure_boot,
//! clone_firmware), which would fail first.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_e2e::firmware_image;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The Secure Boot build (it needs SMM) and variables with Microsoft's keys enrolled, which
/// sign Debian's shim.
const OVMF_SECURE_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const OVMF_MS_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// What the kernel says about Secure Boot, early, on the serial console: `enabled` or
/// `disabled` follows.
const KERNEL_SECURE_BOOT: &str = "secureboot: Secure boot ";
/// How long a firmware may take to say it found nothing to boot, under TCG on a shared host.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(120);
/// OVMF, when no boot option is left: every one failed or was refused.
const OVMF_NOTHING_BOOTS: &str = "BdsDxe: No bootable option or device was found.";
/// OVMF, when the disk's loader cannot run (`Boot0001` is the disk, `UEFI Misc Device` being
/// how OVMF names a virtio disk); the line goes on with the disk's device path and the cause.
const OVMF_DISK_FAILED: &str = "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\"";
/// The cause when Secure Boot refuses the loader: the whole line reads `BdsDxe: failed to load
/// Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied`.
const OVMF_REFUSED: &str = ": Access Denied";
/// The cause when the disk has no `EFI/BOOT/BOOTX64.EFI` at all.
const OVMF_NO_LOADER: &str = ": Not Found";
/// OVMF's next option after the disk: without Secure Boot it starts this shell and waits there.
const OVMF_SHELL: &str = "BdsDxe: starting Boot0002 \"EFI Internal Shell\"";
/// SeaBIOS, when no disk has a boot sector; it prints to the serial port only with
/// `graphics=off` (its serial console, sercon).
const SEABIOS_NOTHING_BOOTS: &str = "No bootable device.";
/// Firmware, GRUB, kernel and systemd under TCG on a shared 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

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

/// A temp folder, a machine with `firmware` whose files are in it, and the image; or None
/// (with a SKIP line) when this host cannot run the firmware or build the image.
fn vm_or_skip(
    test: &str,
    firmware: Firmware,
    build: fn() -> kiln_e2e::Result<std::path::PathBuf>,
) -> Option<(tempfile::TempDir, QemuConfig, std::path::PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = match firmware.config(dir.path()) {
        Ok(cfg) => cfg,
        Err(why) => {
            skip(format_args!("{test}: {why}"));
            return None;
        }
    };
    let disk = image_or_skip(test, build)?;
    Some((dir, cfg, disk))
}

/// Whether OVMF said it could not load the disk's loader, for `cause`.
fn disk_failed(out: &str, cause: &str) -> bool {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .any(|l| l.contains(OVMF_DISK_FAILED) && l.ends_with(cause))
}

/// Boot `disk` (changes discarded) until a serial line has `marker`; the output so far.
fn boot_until(cfg: QemuConfig, disk: &Path, marker: &str, timeout: Duration) -> String {
    let cfg = cfg.arg([
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio,snapshot=on", disk.display()),
    ]);
    let start = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    let line = vm
        .wait_for(marker, timeout)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} after {:.1} s: {line}",
        disk.display(),
        start.elapsed().as_secs_f64()
    );
    vm.output()
}

/// The firmware a VM boots with.
#[derive(Clone, Copy, Debug)]
enum Firmware {
    SeaBios,
    Ovmf,
    OvmfSecure,
    /// The Secure Boot build with the plain variables: no keys enrolled (setup mode).
    OvmfSecureNoKeys,
}

impl Firmware {
    /// A machine with this firmware, its serial console and its own copy of the UEFI
    /// variables in `dir`; or why this host cannot run it.
    fn config(self, dir: &Path) -> Result<QemuConfig, String> {
        let serial = dir.join(format!("{self:?}-serial.log"));
        let (code, vars) = match self {
            Firmware::SeaBios => {
                let mut cfg = QemuConfig::firmware(&serial);
                cfg.machine = "q35,graphics=off".into();
                return Ok(cfg);
            }
            Firmware::Ovmf => (OVMF_CODE, OVMF_VARS),
            Firmware::OvmfSecure => (OVMF_SECURE_CODE, OVMF_MS_VARS),
            Firmware::OvmfSecureNoKeys => (OVMF_SECURE_CODE, OVMF_VARS),
        };
        for file in [code, vars] {
            if !Path::new(file).is_file() {
                return Err(format!("{file} is missing (Debian package ovmf)"));
            }
        }
        // Each VM writes its own copy of the variables.
        let copy = dir.join(format!("{self:?}-vars.fd"));
        std::fs::copy(vars, &copy).map_err(|e| format!("copy {vars}: {e}"))?;
        let mut cfg = QemuConfig::firmware(&serial).arg([
            "-drive".to_string(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
            "-drive".to_string(),
            format!("if=pflash,format=raw,unit=1,file={}", copy.display()),
        ]);
        if let Firmware::OvmfSecure | Firmware::OvmfSecureNoKeys = self {
            // The Secure Boot build keeps its variables behind SMM: without it, it stops early.
            cfg.machine = "q35,smm=on".into();
            cfg = cfg.arg(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        Ok(cfg)
    }
}

/// The trap a build must catch itself: with no keys enrolled the Secure Boot build boots
/// anything, silently with Secure Boot off; only the kernel's line tells.
#[test]
fn secure_boot_without_keys_boots_with_it_off() {
    let test = "secure_boot_without_keys_boots_with_it_off";
    let Some((_dir, cfg, disk)) = vm_or_skip(
        test,
        Firmware::OvmfSecureNoKeys,
        firmware_image::uefi_secure,
    ) else {
        return;
    };
    let out = boot_until(cfg, &disk, KERNEL_SECURE_BOOT, BOOT_TIMEOUT);
    assert!(
        out.contains(&format!("{KERNEL_SECURE_BOOT}disabled")),
        "Secure Boot not off without keys:\n{out}"
    );
}

#[test]
fn uefi_unsigned_image_is_refused_by_secure_boot() {
    let test = "uefi_unsigned_image_is_refused_by_secure_boot";
    let Some((_dir, cfg, disk)) =
        vm_or_skip(test, Firmware::OvmfSecure, firmware_image::uefi_unsigned)
    else {
        return;
    };
    let out = boot_until(cfg, &disk, OVMF_NOTHING_BOOTS, FAILURE_TIMEOUT);
    assert!(
        disk_failed(&out, OVMF_REFUSED),
        "no refusal of the loader:\n{out}"
    );
    assert!(
        !out.contains("GRUB") && !out.contains("Linux version"),
        "the unsigned loader ran:\n{out}"
    );
}

#[test]
fn firmware_reports_a_disk_without_boot_loader() {
    let test = "firmware_reports_a_disk_without_boot_loader";
    if !qemu_available() {
        return skip(format_args!("{test}: qemu-system-x86_64 is not installed"));
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("empty.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let cases = [
        (Firmware::SeaBios, SEABIOS_NOTHING_BOOTS, None),
        (Firmware::Ovmf, OVMF_SHELL, Some(OVMF_NO_LOADER)),
        (
            Firmware::OvmfSecure,
            OVMF_NOTHING_BOOTS,
            Some(OVMF_NO_LOADER),
        ),
    ];
    for (firmware, last, cause) in cases {
        let cfg = match firmware.config(dir.path()) {
            Ok(cfg) => cfg,
            Err(why) => {
                skip(format_args!("{test}: {firmware:?}: {why}"));
                continue;
            }
        };
        eprint!("{test}: {firmware:?}: ");
        let out = boot_until(cfg, &disk, last, FAILURE_TIMEOUT);
        if let Some(cause) = cause {
            assert!(
                disk_failed(&out, cause),
                "{firmware:?}: no `{OVMF_DISK_FAILED}...{cause}`:\n{out}"
            );
        }
    }
}
