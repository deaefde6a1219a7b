//! A module built through UEFI firmware keeps its variables in its clones: the test kit's
//! UEFI image (GPT, ESP, XFS root, cloud-init, no kiln agent) is served as a `url` source from
//! a loopback HTTP server and built with `efiFirmware: {}`; a build step writes a boot entry
//! with `efibootmgr`. The module records the firmware and its captured NVRAM, `kiln clone`
//! gives the clone its own copy of it, and in `kiln run` the clone boots through OVMF on that
//! copy: `kiln exec efibootmgr` there still lists the entry.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::build_common::*;
use kiln_e2e::firmware_image;
use kiln_e2e::module::{clone_run_exec, CloneExec};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const ENTRY: &str = "kiln-test";

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
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert failed");
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
            efibootmgr --create --disk /dev/vda --part 1 --label {ENTRY} --loader '\EFI\BOOT\BOOTX64.EFI'
            efibootmgr | grep -q {ENTRY}
"#,
            port = server.port
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    // A cache of its own: the downloaded image goes when the test's folder does.
    let cache = tmp.path().join("cache");
    let t = Instant::now();
    let out = run_kiln_with(
        &kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
        ],
        &[("KILN_CACHE", &cache)],
    );
    assert!(out.status.success(), "kiln build failed");
    eprintln!("build: {:.0} s", t.elapsed().as_secs_f64());
    assert!(server.hits() >= 1, "the url was never fetched");

    // The module records the firmware it booted through and its captured NVRAM.
    let module = modules.join("fwclone");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    for want in ["firmware: uefi", "booted: true", "nvram: nvram/uefi.fd"] {
        assert!(yaml.contains(want), "no `{want}` in module.yaml:\n{yaml}");
    }
    let captured = std::fs::read(module.join("nvram/uefi.fd")).unwrap();
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
}
