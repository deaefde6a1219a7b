//! `kiln build` of images that boot only through firmware: the kit's UEFI/XFS and BIOS/btrfs
//! images (no kernel kiln can read), each served as a `url` source from a loopback HTTP server
//! and built on the qemu engine with `cloudInit: {}` (cloud-init installs kiln's agent), shell,
//! file and reboot steps. The UEFI build writes a boot entry with `efibootmgr`, and the
//! captured `nvram/<vm>.fd` holds it. Bad input fails fast with its cause: a disk with no boot
//! loader (all zeros) under SeaBIOS and under OVMF, and a missing OVMF before anything boots.
//!
//! Each real build is a firmware, GRUB, kernel and cloud-init boot under TCG (1 to 3 minutes
//! here), plus a reboot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::firmware_image;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// A disk without a boot loader must fail well before the build's boot timeout (10 min
/// below): the firmware says so within seconds, even under TCG on a busy host.
const FAST_FAILURE: Duration = Duration::from_secs(150);

/// The kiln binary when this host can run the firmware builds, else None with a SKIP line.
fn prereqs(test: &str, firmware_file: &str) -> Option<PathBuf> {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(why) => {
            kiln_e2e::skip(format_args!("{test}: {why}"));
            return None;
        }
    };
    if !Path::new(firmware_file).is_file() {
        kiln_e2e::skip(format_args!(
            "{test}: {firmware_file} is missing (Debian packages seabios, ovmf)"
        ));
        return None;
    }
    for t in ["qemu-img", "sha256sum"] {
        if !on_path(t) {
            kiln_e2e::skip(format_args!("{test}: {t} is not installed"));
            return None;
        }
    }
    Some(kiln)
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `raw` as a compressed qcow2 in `dir`, served on loopback: (server, url, sha256).
fn serve_as_qcow2(raw: &Path, dir: &Path) -> (kiln_e2e::http::Server, String, String) {
    let q = dir.join("image.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(raw)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert");
    let sum = sha256(&q);
    let server = kiln_e2e::http::Server::file(q);
    let url = format!("http://127.0.0.1:{}/image.qcow2", server.port);
    (server, url, sum)
}

/// `kiln build` on the qemu engine with the test's own cache (the download goes through the
/// loopback server) and more environment.
fn build(kiln: &Path, manifest: &Path, tmp: &Path, env: &[(&str, &Path)]) -> Output {
    let modules = tmp.join("modules");
    let cache = tmp.join("cache");
    let mut all = vec![("KILN_CACHE", cache.as_path())];
    all.extend_from_slice(env);
    run_kiln_with(
        kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
            "--engine",
            "qemu",
        ],
        &all,
    )
}

/// Writes `<dir>/<name>.yaml` (module `name`): one VM over `url`, with `extra` VM fields and
/// `steps`.
fn manifest(
    dir: &Path,
    name: &str,
    vm: &str,
    (url, sum): (&str, &str),
    extra: &str,
    steps: &str,
) -> PathBuf {
    let m = dir.join(format!("{name}.yaml"));
    let text = format!(
        "vms:\n  - name: {vm}\n    source:\n      url: {url}\n      checksum: sha256:{sum}\n    resources: {{ cpu: 2, memory: 1Gi }}\n    disks:\n      - name: root\n        size: 3Gi\n    communicator: {{ sshTimeout: 10m }}\n    cloudInit: {{}}\n{extra}    provisioners:\n{steps}files:\n  - name: motd\n    inline: \"built through firmware\\n\"\n"
    );
    std::fs::write(&m, text).unwrap();
    m
}

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

/// Checks a successful firmware build's module: the disk is clean, module.yaml's firmware
/// record says what was booted; returns module.yaml.
fn check_module(tmp: &Path, name: &str, vm: &str, firmware: &str) -> String {
    let module = tmp.join("modules").join(name);
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    let disk = module.join(format!("disks/{vm}-root.qcow2"));
    qemu_img_check(&disk).unwrap_or_else(|e| panic!("qemu-img check {}: {e}", disk.display()));
    assert!(
        yaml.contains(&format!("firmware: {firmware}")) && yaml.contains("booted: true"),
        "the firmware record: {yaml}"
    );
    // No kernel of kiln's: the firmware boots the disk's own loader.
    assert!(!module.join("boot").join(vm).exists(), "{yaml}");
    yaml
}

/// One real build of a kit image through firmware.
struct ImageBuild {
    test: &'static str,
    firmware_file: &'static str,
    image: fn() -> kiln_e2e::Result<PathBuf>,
    module: &'static str,
    vm: &'static str,
    extra: &'static str,
    steps: String,
}

/// Builds it (the image served as a compressed qcow2 from loopback); returns the temp folder
/// holding `modules/` and the build's output, or None once the SKIP reason is printed.
fn build_image(b: ImageBuild) -> Option<(tempfile::TempDir, String)> {
    let kiln = prereqs(b.test, b.firmware_file)?;
    if let Some(why) = firmware_image::cannot_build() {
        kiln_e2e::skip(format_args!("{}: {why}", b.test));
        return None;
    }
    let raw = (b.image)().unwrap_or_else(|e| panic!("{}: the image: {e}", b.test));
    let tmp = tempfile::tempdir().unwrap();
    let (server, url, sum) = serve_as_qcow2(&raw, tmp.path());
    let m = manifest(tmp.path(), b.module, b.vm, (&url, &sum), b.extra, &b.steps);
    let start = Instant::now();
    let out = build(&kiln, &m, tmp.path(), &[]);
    eprintln!("{}: build {:.0} s", b.test, start.elapsed().as_secs_f64());
    assert!(out.status.success(), "kiln build failed");
    assert!(server.hits() >= 1, "the url was never fetched");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((tmp, text))
}

#[test]
fn uefi_image_builds_through_ovmf_and_its_nvram_is_captured() {
    // A boot entry written during the build: it lives in the VM's NVRAM only.
    let efibootmgr = "            efibootmgr --create --disk /dev/vda --part 1 --label kiln-test --loader '\\EFI\\BOOT\\BOOTX64.EFI'\n            efibootmgr | grep -q kiln-test\n";
    let Some((tmp, text)) = build_image(ImageBuild {
        test: "uefi_image_builds_through_ovmf_and_its_nvram_is_captured",
        firmware_file: OVMF_CODE,
        image: firmware_image::uefi_xfs,
        module: "fw-uefi",
        vm: "efi",
        extra: "    efiFirmware: {}\n",
        steps: steps(true, efibootmgr),
    }) else {
        return;
    };
    assert!(
        text.contains("efi: boot: firmware (uefi): efiFirmware is set"),
        "{text}"
    );
    let yaml = check_module(tmp.path(), "fw-uefi", "efi", "uefi");
    let nvram = tmp.path().join("modules/fw-uefi/nvram/efi.fd");
    let vars = std::fs::read(&nvram).unwrap();
    assert!(
        yaml.contains("nvram: nvram/efi.fd") && yaml.contains(&sha256(&nvram)),
        "{yaml}"
    );
    let label: Vec<u8> = "kiln-test"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    assert!(
        vars.windows(label.len()).any(|w| w == label.as_slice()),
        "the efibootmgr entry is not in the captured NVRAM"
    );
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
}

/// The step of a build that must fail before it.
const NEVER: &str =
    "      - name: never\n        type: shell\n        shell: { inline: \"true\" }\n";

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
    let start = Instant::now();
    let out = build(&kiln, &m, tmp.path(), &[]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("VM `empty`: the VM cannot boot") && err.contains(cause),
        "{err}"
    );
    assert!(err.contains("last serial console lines"), "{err}");
    assert!(
        took < FAST_FAILURE,
        "{test}: took {took:?}, the boot timeout is 10 min"
    );
    eprintln!("{test}: failed in {:.1} s", took.as_secs_f64());
    assert_no_partial_module(&tmp.path().join("modules"));
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
