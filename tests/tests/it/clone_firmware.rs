//! A module built through UEFI firmware keeps its variables in its clones: the test kit's
//! UEFI image (GPT, ESP, XFS root, cloud-init, no kiln agent) is served as a `url` source from
//! a loopback HTTP server and built with `efiFirmware: {}`; a build step writes a boot entry
//! with `efibootmgr`, then a file step and a reboot through the firmware. The module records
//! the firmware and its captured NVRAM (which holds the entry), `kiln clone` gives the clone
//! its own copy of it, and in `kiln run` the clone boots through OVMF on that copy:
//! `kiln exec efibootmgr` there still lists the entry; and a `buildRef` child without
//! `efiFirmware` builds through UEFI from the parent's NVRAM, the entry still listed.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::build_common::*;
use kiln_e2e::firmware_image;
use kiln_e2e::module::{clone_run_exec, CloneExec};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const ENTRY: &str = "kiln-test";

/// The raw test image as an uncompressed qcow2 (only its data: a fraction of its 3 GiB).
fn to_qcow2(raw: &Path, out: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {}: {st}", raw.display());
}

/// `kiln build` of `manifest` into `modules` with the test's own cache, which must succeed.
fn build(kiln: &Path, manifest: &Path, modules: &Path, cache: &Path) -> std::process::Output {
    let t = Instant::now();
    let out = run_kiln_with(
        kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
        ],
        &[("KILN_CACHE", cache)],
    );
    assert!(
        out.status.success(),
        "kiln build {} failed",
        manifest.display()
    );
    eprintln!("build: {:.0} s", t.elapsed().as_secs_f64());
    out
}

#[test]
fn a_uefi_boot_entry_written_in_the_build_is_there_in_a_clone() {
    let test = "a_uefi_boot_entry_written_in_the_build_is_there_in_a_clone";
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    if !Path::new(OVMF_CODE).is_file() {
        return kiln_e2e::skip(format_args!(
            "{test}: {OVMF_CODE} is missing (Debian package ovmf)"
        ));
    }
    if let Some(why) = firmware_image::cannot_build() {
        return kiln_e2e::skip(format_args!("{test}: {why}"));
    }
    let raw = firmware_image::uefi_xfs().unwrap_or_else(|e| panic!("the UEFI image: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    // Served as qcow2: only the image's data crosses the loopback, not its 3 GiB of holes.
    let image = tmp.path().join("uefi.qcow2");
    to_qcow2(&raw, &image);
    let server = kiln_e2e::http::Server::file(image);
    let manifest = tmp.path().join("fwclone.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"vms:
  - name: uefi
    source:
      url: http://127.0.0.1:{port}/uefi.qcow2
    efiFirmware: {{}}
    cloudInit: {{}}
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 3Gi
    provisioners:
      - name: boot-entry
        type: shell
        shell:
          inline: |
            set -eu
            test -d /sys/firmware/efi
            findmnt -n -o FSTYPE / | grep -qx xfs
            efibootmgr --create --disk /dev/vda --part 1 --label {ENTRY} --loader '\EFI\BOOT\BOOTX64.EFI'
            efibootmgr | grep -q {ENTRY}
      - name: motd
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
            test -d /sys/firmware/efi
            efibootmgr | grep -q {ENTRY}
files:
  - name: motd
    inline: "built through firmware\n"
"#,
            port = server.port
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    // A cache of its own: the downloaded image goes when the test's folder does.
    let cache = tmp.path().join("cache");
    let out = build(&kiln, &manifest, &modules, &cache);
    assert!(server.hits() >= 1, "the url was never fetched");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uefi: boot: firmware (uefi): efiFirmware is set"),
        "{err}"
    );

    // The module records the firmware it booted through and its captured NVRAM.
    let module = modules.join("fwclone");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    for want in ["firmware: uefi", "booted: true", "nvram: nvram/uefi.fd"] {
        assert!(yaml.contains(want), "no `{want}` in module.yaml:\n{yaml}");
    }
    let disk = module.join("disks/uefi-root.qcow2");
    qemu_img_check(&disk).unwrap_or_else(|e| panic!("qemu-img check {}: {e}", disk.display()));
    let captured = std::fs::read(module.join("nvram/uefi.fd")).unwrap();
    assert!(
        yaml.contains(&sha256sum(&module.join("nvram/uefi.fd"))),
        "{yaml}"
    );
    // The boot entry lives in the VM's NVRAM only: the captured variables hold its label.
    let label: Vec<u8> = ENTRY.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    assert!(
        captured.windows(label.len()).any(|w| w == label.as_slice()),
        "the efibootmgr entry is not in the captured NVRAM"
    );
    let ls = run_kiln(&kiln, &["ls", "--modules", modules.to_str().unwrap()]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("fwclone") && l.contains("uefi")),
        "{ls}"
    );

    let clones = tmp.path().join("clones");
    let t = Instant::now();
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "fwclone",
            modules: &modules,
            clones: &clones,
            count: None,
            vm: "uefi",
            run_dir: &tmp.path().join("run"),
            env: &[("KILN_CACHE", cache.as_os_str())],
        },
        &["efibootmgr"],
    )
    .unwrap();
    let listed = String::from_utf8_lossy(&exec.stdout);
    eprintln!("--- efibootmgr in the clone\n{listed}");
    assert!(exec.status.success(), "kiln exec efibootmgr failed");
    assert!(
        listed.contains(ENTRY),
        "the clone's firmware lost the build's boot entry:\n{listed}"
    );
    eprintln!("clone, run, exec: {:.0} s", t.elapsed().as_secs_f64());
    // The clone booted on its own copy; the module's NVRAM is as captured.
    let own = clones.join("fwclone-1/nvram/uefi.fd");
    assert!(own.is_file(), "no {}", own.display());
    assert_eq!(
        std::fs::read(module.join("nvram/uefi.fd")).unwrap(),
        captured
    );
    let serial = std::fs::read_to_string(clones.join("fwclone-1/uefi-serial.log")).unwrap();
    assert!(
        serial.contains("EFI") || serial.contains("BdsDxe"),
        "no sign of OVMF on the clone's console"
    );

    // A buildRef child that sets no efiFirmware inherits UEFI and the parent's NVRAM: the
    // boot entry is there in its build.
    let child = tmp.path().join("fwchild.yaml");
    std::fs::write(
        &child,
        format!(
            r#"vms:
  - name: kid
    source:
      buildRef: {{ name: fwclone }}
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 3Gi
    provisioners:
      - name: inherited-entry
        type: shell
        shell:
          inline: |
            set -eu
            test -d /sys/firmware/efi
            efibootmgr | grep -q {ENTRY}
"#
        ),
    )
    .unwrap();
    let out = build(&kiln, &child, &modules, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kid: boot: firmware (uefi): the parent module booted through it"),
        "{err}"
    );
    let yaml = std::fs::read_to_string(modules.join("fwchild/module.yaml")).unwrap();
    for want in ["firmware: uefi", "booted: true", "nvram: nvram/kid.fd"] {
        assert!(
            yaml.contains(want),
            "no `{want}` in the child's module.yaml:\n{yaml}"
        );
    }
}

const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// systemd's status line once the whole boot is done.
const BOOTED: &str = "Multi-User System";
/// OVMF, GRUB, the kernel and systemd under TCG on a shared 2-core machine.
const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(480);

fn sha256sum(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", p.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Without a firmware build: a module folder made by hand around the test kit's UEFI image,
/// recorded as built through UEFI with OVMF's blank variables as its NVRAM. Its clone boots
/// through OVMF under `kiln run` (the qemu engine, picked for the firmware) to systemd, and
/// the firmware's writes land in the clone's own NVRAM, not the module's.
#[test]
fn a_clone_of_a_uefi_module_boots_through_ovmf_on_its_own_nvram() {
    let test = "a_clone_of_a_uefi_module_boots_through_ovmf_on_its_own_nvram";
    let Some(kiln) = kiln_bin() else {
        return kiln_e2e::skip(format_args!("{test}: the kiln binary is not built"));
    };
    if !on_path("qemu-system-x86_64") {
        return kiln_e2e::skip(format_args!("{test}: qemu-system-x86_64 is not installed"));
    }
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return kiln_e2e::skip(format_args!("{test}: {f} is missing (Debian package ovmf)"));
        }
    }
    if let Some(why) = firmware_image::cannot_build() {
        return kiln_e2e::skip(format_args!("{test}: {why}"));
    }
    let raw = firmware_image::uefi_xfs().unwrap_or_else(|e| panic!("the UEFI image: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let (modules, clones) = (tmp.path().join("modules"), tmp.path().join("clones"));
    let module = modules.join("fwhand");
    std::fs::create_dir_all(module.join("disks")).unwrap();
    std::fs::create_dir_all(module.join("nvram")).unwrap();
    let disk = module.join("disks/uefi-root.qcow2");
    to_qcow2(&raw, &disk);
    let nvram = module.join("nvram/uefi.fd");
    std::fs::copy(OVMF_VARS, &nvram).unwrap();
    let captured = std::fs::read(&nvram).unwrap();
    std::fs::write(
        module.join("module.yaml"),
        format!(
            r#"apiVersion: kiln/v1
kind: Module
name: fwhand
kilnVersion: test
engine: qemu
builtAt: 0
buildSeconds: 0
vms:
  - name: uefi
    cpus: 1
    memoryMib: 1024
    source: {{ test: hand-made }}
    agentInImage: false
    firmware:
      firmware: uefi
      booted: true
      nvram: nvram/uefi.fd
      nvramSha256: {nvram_sha}
    disks:
      - name: root
        file: disks/uefi-root.qcow2
        sha256: {disk_sha}
        virtualSize: {size}
        fileSize: {file_size}
manifest: ""
"#,
            nvram_sha = sha256sum(&nvram),
            disk_sha = sha256sum(&disk),
            size = std::fs::metadata(&raw).unwrap().len(),
            file_size = std::fs::metadata(&disk).unwrap().len(),
        ),
    )
    .unwrap();
    let (m, c) = (modules.to_str().unwrap(), clones.to_str().unwrap());
    let ls = run_kiln(&kiln, &["ls", "--modules", m]);
    assert!(
        String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with("fwhand") && l.contains("uefi")),
        "kiln ls does not show the firmware"
    );
    let out = run_kiln(&kiln, &["clone", "fwhand", "--modules", m, "--clones", c]);
    assert!(out.status.success(), "kiln clone failed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fwhand-1/uefi: boots through uefi firmware"),
        "kiln clone does not say how the VM boots"
    );
    let own = clones.join("fwhand-1/nvram/uefi.fd");
    assert_eq!(std::fs::read(&own).unwrap(), captured);

    let run_log = tmp.path().join("run.log");
    let t = Instant::now();
    let run = kiln_e2e::module::Run(
        Command::new(&kiln)
            .args(["run", "fwhand-1", "--clones", c])
            .env("KILN_NO_INTERNET", "true")
            .env("KILN_RUN_DIR", tmp.path().join("run"))
            .stderr(std::fs::File::create(&run_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let serial = clones.join("fwhand-1/uefi-serial.log");
    let mut run = run;
    let booted = loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains(BOOTED) {
            break Ok(console);
        }
        if let Ok(Some(st)) = run.0.try_wait() {
            break Err(format!("kiln run ended ({st})"));
        }
        if t.elapsed() > BOOT_TIMEOUT {
            break Err(format!("no `{BOOTED}` in {:?}", BOOT_TIMEOUT));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    drop(run);
    let run_err = std::fs::read_to_string(&run_log).unwrap_or_default();
    eprintln!("--- kiln run stderr\n{run_err}");
    let console = booted.unwrap_or_else(|e| {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!("{e}; console:\n{console}")
    });
    eprintln!("booted through OVMF in {:.0} s", t.elapsed().as_secs_f64());
    assert!(
        run_err.contains("firmware") && run_err.contains("qemu"),
        "kiln run does not say it picked qemu for the firmware"
    );
    assert!(
        run_err.contains("boots through uefi firmware (its own NVRAM"),
        "{run_err}"
    );
    assert!(console.contains("EFI"), "no sign of UEFI on the console");
    // The firmware wrote its variables (boot options, counters) into the clone's copy only.
    assert_eq!(
        std::fs::read(module.join("nvram/uefi.fd")).unwrap(),
        captured
    );
    assert_ne!(
        std::fs::read(&own).unwrap(),
        captured,
        "OVMF wrote nothing to the clone's NVRAM"
    );
}
