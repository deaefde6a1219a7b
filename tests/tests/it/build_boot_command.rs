//! `bootCommand` in a build: keys typed into the VM's keyboard through QEMU's control socket.
//! A bootstrap VM booted through firmware shows kiln's GRUB menu for one second; the boot
//! command stops it (arrow keys from the start), edits the entry (`e`, `<end>`, text,
//! Ctrl-X) and the guest proves it booted the edited line. Screenshots land in the module's
//! logs. A VM whose boot command leaves it at GRUB's command line never answers: it fails at
//! its `sshTimeout` with the last screenshot and the console's last lines.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use crate::build_common::*;

/// PNG files named `<vm>-boot-NN.png` in `logs`, checked to be PNGs.
fn screenshots(logs: &Path, vm: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(logs)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{vm}-boot-")) && n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for n in &names {
        let data = std::fs::read(logs.join(n)).unwrap();
        assert!(
            data.starts_with(b"\x89PNG\r\n\x1a\n") && data.get(12..16) == Some(b"IHDR"),
            "{n} is no PNG"
        );
    }
    names
}

/// Writes `<dir>/<vm>.yaml`: a bootstrap VM booted through kiln's GRUB, whose boot command
/// stops the menu and then types `then`.
fn manifest(dir: &Path, vm: &str, extra: &str, then: &str) -> PathBuf {
    // kiln's GRUB waits one second: arrow keys from the VM's first second on stop the
    // countdown whenever the menu comes (they do nothing in SeaBIOS). About a minute of them
    // (the menu comes late on a busy host), slow enough for GRUB under TCG to read each
    // before the next, also once it redraws the long (wrapped) `linux` line after each key:
    // keys sent faster overflow the keyboard's queue and are lost.
    let arrows = "<down>".repeat(20);
    let mut lines = String::new();
    for _ in 0..6 {
        lines.push_str(&format!("      - \"{arrows}\"\n"));
    }
    let m = dir.join(format!("{vm}.yaml"));
    std::fs::write(
        &m,
        format!(
            r#"vms:
  - name: {vm}
    source:
      bootstrap: {{ distro: debian, suite: bookworm, packages: [busybox] }}
    resources: {{ cpu: 1, memory: 512Mi }}
    boot: firmware
{extra}    bootWait: 1s
    bootKeyInterval: 500ms
    bootCommand:
{lines}      - "{then}"
    provisioners:
      - name: check
        type: shell
        shell:
          inline: |
            set -eu
            cat /proc/cmdline
            grep -q kiln.marker=typed /proc/cmdline
"#
        ),
    )
    .unwrap();
    m
}

/// `kiln build` of `m` into `<dir>/modules` on qemu: its output and stdout+stderr.
fn build(kiln: &Path, m: &Path, dir: &Path) -> (Output, String) {
    let start = Instant::now();
    let modules = dir.join("modules");
    let out = run_kiln(
        kiln,
        &[
            "build",
            m.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
            "--engine",
            "qemu",
        ],
    );
    eprintln!("build {:.0} s", start.elapsed().as_secs_f64());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, all)
}

#[test]
fn a_boot_command_edits_the_grub_entry_of_a_firmware_boot() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // GRUB's editor shows `setparams` and an empty line first, then the `linux` line.
    let m = manifest(
        tmp.path(),
        "typed",
        "",
        "<wait1>e<down><down><end> kiln.marker=typed<leftCtrlOn>x<leftCtrlOff>",
    );
    let (out, all) = build(&kiln, &m, tmp.path());
    assert!(out.status.success(), "kiln build failed");
    assert!(all.contains("boot command typed"), "{all}");
    let logs = tmp.path().join("modules/typed/logs");
    let shots = screenshots(&logs, "typed");
    // Before the first key, after the `<wait1>`, at the end.
    assert_eq!(
        shots,
        [
            "typed-boot-00.png",
            "typed-boot-01.png",
            "typed-boot-02.png"
        ],
        "{}",
        logs.display()
    );
    assert!(
        all.contains("boot command screenshot: logs/typed-boot-02.png"),
        "the notes name them: {all}"
    );
    let steps = std::fs::read_to_string(logs.join("typed.log")).unwrap();
    assert!(steps.contains("kiln.marker=typed"), "{steps}");
}

#[test]
fn a_vm_left_at_grubs_command_line_fails_at_its_timeout_with_its_last_screenshot() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The agent never starts: the VM waits at `grub>` (which is no boot failure by itself).
    let m = manifest(
        tmp.path(),
        "deaf",
        "    communicator: { sshTimeout: 150s }\n",
        "<wait1>c<wait1>echo kiln-never-boots<enter>",
    );
    let start = Instant::now();
    let (out, all) = build(&kiln, &m, tmp.path());
    let took = start.elapsed();
    assert!(!out.status.success(), "the build succeeded");
    assert!(
        all.contains("no answer after its boot command (last screenshot logs/deaf-boot-03.png): ")
            && all.contains("last serial console lines")
            && all.contains("kiln-never-boots"),
        "{all}"
    );
    // At the boot timeout, not the build's (30 minutes).
    assert!(took.as_secs() < 600, "{took:?}");
    // The failed build's kept logs hold the screenshots the error names.
    let kept: Vec<_> = std::fs::read_dir(tmp.path().join("modules/.logs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        screenshots(&kept[0], "deaf").len(),
        4,
        "{}",
        kept[0].display()
    );
}
