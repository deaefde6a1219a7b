//! ISO installs end to end, with the manifest a user writes: a `blank` disk, the test kit's
//! installer CD (`kiln_e2e::installer`, served from loopback with its checksum), and the
//! installer's answers given as a real installer gets them. BIOS: the boot command stops the
//! GRUB menu (`e`), goes to the kernel line and types
//! `url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/answers` (served from `httpDirectory`), then
//! Ctrl-X. UEFI: the answers are on the floppy and the boot command only presses Enter. kiln
//! then reaches the installed system over SSH with the password from the answers and runs
//! shell, file and reboot steps; the module is captured (what the steps wrote is read from
//! the disk from outside), cloned, and `kiln run` + `kiln exec` work on the clone (the build
//! installed kiln's agent over SSH).
//!
//! Failures of the SSH communicator start from a disk the kit installed once (a `file` source
//! without `cloudInit`, so SSH is the only way in): a wrong password is an authentication
//! error, not a timeout, and a system whose sshd never starts fails at `sshTimeout` with the
//! console's last lines.
//!
//! Each install is a GRUB menu, the installer kernel and a ~350 MB copy under TCG: minutes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::build_common::*;
use crate::firmware_common::{build, prereqs, sha256, OVMF_CODE, SEABIOS};
use kiln_e2e::installer::{self, Answers};
use kiln_e2e::module::{clone_run_exec, CloneExec};

const PASSWORD: &str = "kiln-install-test";

/// Steps over SSH: a shell step, a file step, a reboot, and a check that both survived.
const STEPS: &str = r#"    provisioners:
      - name: first
        type: shell
        shell:
          inline: |
            set -eu
            uname -a
            echo "written over ssh" > /root/first
      - name: motd
        type: file
        file:
          fileRef: motd
          destination: /root/x
      - name: restart
        type: reboot
      - name: after-reboot
        type: shell
        shell:
          inline: |
            set -eu
            grep -q "written over ssh" /root/first
            grep -q "installed from an ISO" /root/x
            test "$(hostname)" = box
"#;

/// The installer CD served on loopback: (server, url, sha256), or None once the SKIP line is
/// printed.
fn served_iso(test: &str) -> Option<(kiln_e2e::http::Server, String, String)> {
    if let Some(why) = installer::cannot_build() {
        kiln_e2e::skip(format_args!("{test}: cannot make the installer CD: {why}"));
        return None;
    }
    let iso = installer::installer_iso().unwrap_or_else(|e| panic!("{test}: the CD: {e}"));
    let sum = sha256(&iso);
    let server = kiln_e2e::http::Server::file(iso);
    let url = format!("http://127.0.0.1:{}/installer.iso", server.port);
    Some((server, url, sum))
}

/// A one-VM module `name` installed from the CD, with `extra` VM fields and `files_yaml`
/// (the top-level `files`, `httpDirectory`, ...).
fn iso_manifest(
    dir: &Path,
    name: &str,
    (url, sum): (&str, &str),
    extra: &str,
    top: &str,
) -> PathBuf {
    let m = dir.join(format!("{name}.yaml"));
    let text = format!(
        "vms:\n  - name: box\n    source: {{ blank: true }}\n    resources: {{ cpu: 2, memory: 1Gi }}\n    disks: [{{ name: root, size: 4Gi }}]\n    isos: [{{ url: \"{url}\", checksum: \"{sum}\" }}]\n{extra}    communicator: {{ type: ssh, sshUsername: root, sshPassword: \"{PASSWORD}\", sshTimeout: 20m }}\n{STEPS}{top}"
    );
    std::fs::write(&m, text).unwrap();
    m
}

/// The `files` entries: the answers and the file step's content.
fn files(answers: &Answers) -> String {
    format!(
        "files:\n  - name: answers\n    inline: {:?}\n  - name: motd\n    inline: \"installed from an ISO\\n\"\n",
        answers.render()
    )
}

fn answers() -> Answers<'static> {
    Answers {
        root_password: PASSWORD,
        hostname: "box",
        disk: Some("/dev/vda"),
        ssh: true,
    }
}

/// Builds, checks the module and what the steps left on its disk, clones it, runs the clone
/// and execs in it.
fn install_build_clone(test: &str, firmware_file: &str, name: &str, extra: &str, top: &str) {
    let Some(kiln) = prereqs(test, firmware_file) else {
        return;
    };
    let Some((server, url, sum)) = served_iso(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = iso_manifest(tmp.path(), name, (&url, &sum), extra, top);
    let t = Instant::now();
    let out = build(&kiln, &m, tmp.path(), &[]);
    eprintln!("{test}: build {:.0} s", t.elapsed().as_secs_f64());
    assert!(out.status.success(), "kiln build failed");
    assert!(server.hits() >= 1, "the ISO was never fetched");
    let module = tmp.path().join("modules").join(name);
    let disk = module.join("disks/box-root.qcow2");
    qemu_img_check(&disk).unwrap_or_else(|e| panic!("qemu-img check {}: {e}", disk.display()));
    // Only the VM's disk is captured: no CD, no floppy.
    let captured: Vec<String> = std::fs::read_dir(module.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(captured, ["box-root.qcow2"], "captured disks");
    // What the SSH steps wrote is on the captured disk, read from outside.
    let raw = tmp.path().join("captured.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert");
    for (path, text) in [
        ("/root/x", "installed from an ISO"),
        ("/root/first", "written over ssh"),
    ] {
        let got = debugfs_cat(&raw, path);
        assert!(got.contains(text), "{path} on the captured disk: {got:?}");
    }
    let _ = std::fs::remove_file(&raw);
    clone_runs_and_takes_exec(&kiln, tmp.path(), name);
}

/// A file of the installed root (at [`installer::ROOT_OFFSET`]) of a raw disk, by debugfs.
fn debugfs_cat(raw: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(format!(
            "{}?offset={}",
            raw.display(),
            installer::ROOT_OFFSET
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kiln clone` the module, `kiln run` its first clone and `kiln exec` in it: the build
/// installed kiln's agent over SSH (root, systemd), so the module carries it. The command reads
/// a file an SSH step wrote and the hostname from the installer's answers.
fn clone_runs_and_takes_exec(kiln: &Path, tmp: &Path, module: &str) {
    let cache = tmp.join("cache");
    let t = Instant::now();
    let exec = clone_run_exec(
        &CloneExec {
            kiln,
            module,
            modules: &tmp.join("modules"),
            clones: &tmp.join("clones"),
            count: None,
            vm: "box",
            run_dir: &tmp.join("run"),
            env: &[("KILN_CACHE", cache.as_os_str())],
        },
        &["sh", "-c", "cat /root/first; hostname"],
    )
    .unwrap();
    let out = String::from_utf8_lossy(&exec.stdout);
    assert!(
        exec.status.success(),
        "kiln exec in the clone failed: {out}"
    );
    assert!(out.contains("written over ssh"), "{out}");
    eprintln!(
        "{module}: clone, run, exec in {:.0} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn bios_install_with_answers_over_http_then_ssh_steps_and_a_clone() {
    let answers = answers();
    install_build_clone(
        "bios_install_with_answers_over_http_then_ssh_steps_and_a_clone",
        SEABIOS,
        "iso-bios",
        "    bootWait: 15s\n    bootKeyInterval: 300ms\n    bootCommand: [\"e<down><down><end> url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/answers<leftCtrlOn>x<leftCtrlOff>\"]\n",
        &format!("{}httpDirectory: {{ files: [{{ name: answers }}] }}\n", files(&answers)),
    );
}

#[test]
fn uefi_install_with_answers_on_the_floppy_then_ssh_steps_and_a_clone() {
    let answers = answers();
    install_build_clone(
        "uefi_install_with_answers_on_the_floppy_then_ssh_steps_and_a_clone",
        OVMF_CODE,
        "iso-uefi",
        // OVMF takes longer than SeaBIOS to reach GRUB; the menu waits 30 s.
        "    efiFirmware: {}\n    floppy: { files: [{ name: answers }] }\n    bootWait: 15s\n    bootCommand: [\"<enter>\"]\n",
        &files(&answers),
    );
}

/// A module over a disk the kit installed with `answers`, reached over SSH with `password`
/// (a `file` source without `cloudInit`: kiln cannot put its agent in); the build must fail.
/// Returns kiln's stderr and how long the build took.
fn build_installed(
    test: &str,
    answers: &Answers,
    password: &str,
    timeout: &str,
) -> Option<(String, Duration)> {
    let kiln = prereqs(test, SEABIOS)?;
    if let Some(why) = installer::cannot_build() {
        kiln_e2e::skip(format_args!("{test}: cannot make the installer CD: {why}"));
        return None;
    }
    let installed =
        installer::installed_disk(answers).unwrap_or_else(|e| panic!("{test}: install: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("installed.qcow2");
    std::fs::copy(&installed, &local).unwrap();
    let m = tmp.path().join("installed.yaml");
    std::fs::write(
        &m,
        format!(
            "vms:\n  - name: box\n    source: {{ file: installed.qcow2 }}\n    boot: firmware\n    resources: {{ cpu: 2, memory: 1Gi }}\n    disks: [{{ name: root, size: 4Gi }}]\n    communicator: {{ type: ssh, sshUsername: root, sshPassword: \"{password}\", sshTimeout: {timeout} }}\n    provisioners:\n      - name: never\n        type: shell\n        shell: {{ inline: \"true\" }}\n"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let out = build(&kiln, &m, tmp.path(), &[]);
    let took = t.elapsed();
    assert!(!out.status.success(), "{test}: the build must fail");
    assert_no_partial_module(&tmp.path().join("modules"));
    Some((String::from_utf8_lossy(&out.stderr).into_owned(), took))
}

#[test]
fn a_wrong_ssh_password_is_an_authentication_error_not_a_timeout() {
    let test = "a_wrong_ssh_password_is_an_authentication_error_not_a_timeout";
    let Some((err, took)) = build_installed(test, &answers(), "not-the-password", "15m") else {
        return;
    };
    let lower = err.to_lowercase();
    assert!(lower.contains("authentication"), "{err}");
    assert!(!lower.contains("timed out"), "{err}");
    // The guest was reached: a boot to sshd takes half a minute or more under TCG (a
    // manifest refused before boot fails in a second). The timeout is 15 minutes.
    assert!(
        took > Duration::from_secs(20) && took < Duration::from_secs(600),
        "{test}: took {took:?}"
    );
    eprintln!("{test}: failed in {:.0} s", took.as_secs_f64());
}

#[test]
fn sshd_never_starting_fails_at_ssh_timeout_with_the_console() {
    let test = "sshd_never_starting_fails_at_ssh_timeout_with_the_console";
    let no_ssh = Answers {
        ssh: false,
        ..answers()
    };
    // The installed system reaches its login prompt in 30-50 s under TCG: 150 s leave room
    // for a loaded host.
    let Some((err, took)) = build_installed(test, &no_ssh, PASSWORD, "150s") else {
        return;
    };
    assert!(err.contains("sshTimeout") || err.contains("150s"), "{err}");
    // The console shows the installed system up, at its login prompt, without sshd.
    assert!(err.contains("box login:"), "{err}");
    assert!(
        took >= Duration::from_secs(150),
        "{test}: failed before the timeout: {took:?}"
    );
    eprintln!("{test}: failed in {:.0} s", took.as_secs_f64());
}
