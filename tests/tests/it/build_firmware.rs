//! `kiln build` of images that boot only through firmware: the kit's UEFI/XFS and BIOS/btrfs
//! images (no kernel kiln can read), each served as a `url` source from a loopback HTTP server
//! and built on the qemu engine with `cloudInit: {}` (cloud-init installs kiln's agent), shell,
//! file and reboot steps. Bad input fails fast with its cause: a disk with no boot
//! loader (all zeros) under SeaBIOS and under OVMF, and a missing OVMF before anything boots.
//! The BIOS module is then cloned and run (`kiln run` + `kiln exec`); the UEFI build, its
//! NVRAM and its clone are in clone_firmware.rs, the Secure Boot one in build_secure_boot.rs.
//!
//! Each real build is a firmware, GRUB, kernel and cloud-init boot under TCG (1 to 3 minutes
//! here), plus a reboot.

use std::path::Path;

use crate::build_common::*;
use crate::firmware_common::*;
use kiln_e2e::firmware_image;

/// Steps that show the guest runs its own boot path: `efi` says whether it booted by UEFI;
/// a file step, a reboot, and a check after it.
fn steps(efi: bool, more: &str) -> String {
    let test = if efi { "test -d" } else { "! test -e" };
    format!(
        r#"      - name: firmware
        type: shell
        shell:
          inline: |
            set -eu
            {test} /sys/firmware/efi
            findmnt -n -o FSTYPE / > /etc/kiln-root-fs
{more}      - name: motd
        type: file
        file:
          fileRef: motd
          destination: /etc/motd
      - name: restart
        type: reboot
      - name: after-reboot
        type: shell
        shell:
          inline: |
            set -eu
            grep -q "built through firmware" /etc/motd
            {test} /sys/firmware/efi
"#
    )
}

#[test]
fn bios_image_builds_through_seabios() {
    let Some((tmp, text)) = build_image(ImageBuild {
        test: "bios_image_builds_through_seabios",
        firmware_file: SEABIOS,
        image: firmware_image::bios_btrfs,
        module: "fw-bios",
        vm: "legacy",
        extra: "",
        steps: steps(false, "            grep -qx btrfs /etc/kiln-root-fs\n"),
    }) else {
        return;
    };
    // Auto: a btrfs root has no kernel kiln reads, so the image's own GRUB boots it.
    assert!(
        text.contains(
            "legacy: boot: firmware (bios): no kernel kiln can read (no ext4 file system"
        ),
        "{text}"
    );
    let yaml = check_module(tmp.path(), "fw-bios", "legacy", "bios");
    assert!(!yaml.contains("nvram:"), "BIOS keeps no NVRAM: {yaml}");
    assert!(!tmp.path().join("modules/fw-bios/nvram").exists());
    // The module's clone boots through SeaBIOS in `kiln run`, with what the build wrote.
    let kiln = kiln_bin().expect("checked by build_image");
    let fs = clone_run(
        &kiln,
        tmp.path(),
        "fw-bios",
        "legacy",
        &["cat", "/etc/kiln-root-fs"],
    );
    assert_eq!(fs.trim(), "btrfs", "the clone's /etc/kiln-root-fs");
}

/// A disk of zeros (no boot loader, no kernel) as a `url` source.
fn zero_disk(dir: &Path) -> (kiln_e2e::http::Server, String, String) {
    let body = vec![0u8; 64 << 20];
    let p = dir.join("zeros.raw");
    std::fs::write(&p, &body).unwrap();
    let sum = sha256(&p);
    std::fs::remove_file(&p).unwrap();
    let server = kiln_e2e::http::Server::bytes(body);
    let url = format!("http://127.0.0.1:{}/zeros.raw", server.port);
    (server, url, sum)
}

/// Builds the zero disk with `extra` VM fields; the build must fail with `cause`, naming the
/// VM, well before the boot timeout.
fn fails_without_a_loader(test: &str, firmware_file: &str, extra: &str, cause: &str) {
    let Some(kiln) = prereqs(test, firmware_file) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_server, url, sum) = zero_disk(tmp.path());
    let m = manifest(tmp.path(), "zeros", "empty", (&url, &sum), extra, NEVER);
    fails_fast(test, &kiln, &m, tmp.path(), "empty", cause);
}

#[test]
fn a_disk_without_a_boot_loader_fails_fast_under_seabios() {
    fails_without_a_loader(
        "a_disk_without_a_boot_loader_fails_fast_under_seabios",
        SEABIOS,
        "",
        "the BIOS found no bootable device",
    );
}

#[test]
fn a_disk_without_a_boot_loader_fails_fast_under_ovmf() {
    fails_without_a_loader(
        "a_disk_without_a_boot_loader_fails_fast_under_ovmf",
        OVMF_CODE,
        "    efiFirmware: {}\n",
        "the UEFI firmware found no boot loader on the disk",
    );
}

#[test]
fn a_missing_ovmf_fails_before_boot() {
    let test = "a_missing_ovmf_fails_before_boot";
    let Some(kiln) = kiln_bin() else {
        return kiln_e2e::skip(format_args!(
            "{test}: the kiln binary is not built next to this test"
        ));
    };
    for t in ["sha256sum", "qemu-system-x86_64"] {
        if !on_path(t) {
            return kiln_e2e::skip(format_args!("{test}: {t} is not installed"));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_server, url, sum) = zero_disk(tmp.path());
    let empty = tmp.path().join("no-firmware");
    std::fs::create_dir(&empty).unwrap();
    let efi = "    efiFirmware: {}\n";
    let m = manifest(tmp.path(), "noovmf", "efi", (&url, &sum), efi, NEVER);
    let out = build(&kiln, &m, tmp.path(), &[("KILN_FIRMWARE_DIR", &empty)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("VM `efi`: uefi boot needs OVMF_CODE_4M.fd, which is not installed")
            && err.contains("`ovmf`"),
        "{err}"
    );
    assert!(!err.contains("Booting"), "nothing may boot: {err}");
}
