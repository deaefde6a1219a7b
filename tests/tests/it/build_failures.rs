//! `kiln build` failures: each fails the build with a clear message and leaves no module.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::build_common::*;

/// A build that failed: its stderr and how long it took. The temp folder lives as long.
struct FailedBuild {
    stderr: String,
    took: Duration,
    modules: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Builds `steps` on a bootstrapped Debian VM `box` as module `name`, checking that the build
/// fails and writes no module.
fn failed_build(kiln: &Path, name: &str, steps: &str) -> FailedBuild {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(tmp.path(), name, &bootstrap_vm("box", steps));
    let modules = tmp.path().join("modules");
    let start = Instant::now();
    let out = run_kiln(kiln, &["build", &m, "--output", modules.to_str().unwrap()]);
    let took = start.elapsed();
    assert!(!out.status.success());
    assert!(!modules.join(name).exists());
    FailedBuild {
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
        modules,
        _tmp: tmp,
    }
}

#[test]
fn bad_checksum_stops_before_boot() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    // A loopback server with an "image" whose digest is not the one the manifest states.
    let port = kiln_e2e::http::Server::bytes(b"this is not a disk image".to_vec()).port;
    let tmp = tempfile::tempdir().unwrap();
    let want = "0".repeat(64);
    let m = write_manifest(
        tmp.path(),
        "badsum",
        &format!(
            "vms:\n  - name: web\n    source:\n      url: http://127.0.0.1:{port}/disk.qcow2\n      checksum: sha256:{want}\n    cloudInit: {{}}\n    resources: {{ cpu: 1, memory: 512Mi }}\n"
        ),
    );
    let modules = tmp.path().join("modules");
    let cache = tmp.path().join("cache");
    let out = Command::new(&kiln)
        .args([
            "build",
            &m,
            "--no-cache",
            "--output",
            modules.to_str().unwrap(),
        ])
        .env("KILN_CACHE", &cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success());
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&want), "{err}");
    assert!(!err.contains("Booting"), "nothing may boot: {err}");
    assert!(!modules.join("badsum").exists());
    assert_no_partial_module(&modules);
}

#[test]
fn dead_file_url_stops_the_build_before_anything_boots() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    // A loopback port nothing listens on: the URL is dead.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/tools.tar");
    let tmp = tempfile::tempdir().unwrap();
    // The URL is used by the last step only: fetched when used, it would fail after the
    // bootstrap, the boot and the steps before it.
    let steps = "      - name: first\n        type: shell\n        shell:\n          inline: \"echo first\\n\"\n      - name: tools\n        type: file\n        file: { fileRef: tools.tar, destination: /opt/tools.tar }\n";
    let m = write_manifest(
        tmp.path(),
        "deadurl",
        &format!(
            "files:\n  - name: tools.tar\n    url: {url}\n{}",
            bootstrap_vm("box", steps)
        ),
    );
    let modules = tmp.path().join("modules");
    let start = Instant::now();
    let out = Command::new(&kiln)
        .args([
            "build",
            &m,
            "--no-cache",
            "--output",
            modules.to_str().unwrap(),
            "--json",
        ])
        .env("KILN_CACHE", tmp.path().join("cache"))
        .env("KILN_NO_INTERNET", "true")
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let events = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- stdout\n{events}--- stderr\n{err}");
    assert!(!out.status.success());
    assert!(err.contains(&url), "the URL is named: {err}");
    assert!(err.contains("file `tools.tar`"), "the file is named: {err}");
    assert!(err.contains("cannot reach"), "the reason is given: {err}");
    // No VM got as far as its source, let alone a boot.
    for phase in ["SourceImporting", "Booting"] {
        assert!(!events.contains(phase), "{phase} reached: {events}");
    }
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(!modules.join("deadurl").exists());
    assert_no_partial_module(&modules);
}

#[test]
fn ssh_timeout_bounds_the_wait_for_the_agent() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // No guest boots to its agent in 2 s under TCG: the wait must end then, not at 5 min.
    let m = write_manifest(
        tmp.path(),
        "impatient",
        &bootstrap_vm(
            "box",
            "      - { name: never, type: shell, shell: { inline: \"true\" } }\n",
        )
        .replace(
            "    provisioners:\n",
            "    communicator: { sshTimeout: 2s }\n    provisioners:\n",
        ),
    );
    let modules = tmp.path().join("modules");
    let out = run_kiln(&kiln, &["build", &m, "--output", modules.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not answer within 2"),
        "the boot wait is sshTimeout: {err}"
    );
    assert!(!modules.join("impatient").exists());
    assert_no_partial_module(&modules);
}

#[test]
fn failing_step_fails_the_build_with_name_code_and_output() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let steps = "      - name: fine\n        type: shell\n        shell:\n          inline: \"echo all good\\n\"\n      - name: breaks\n        type: shell\n        shell:\n          inline: \"echo about to fail; echo details >&2; exit 7\\n\"\n      - name: never\n        type: shell\n        shell:\n          inline: \"touch /never\\n\"\n";
    let f = failed_build(&kiln, "failing", steps);
    let err = &f.stderr;
    assert!(err.contains("'breaks'"), "{err}");
    assert!(err.contains("exit code 7"), "{err}");
    assert!(
        err.contains("about to fail") && err.contains("details"),
        "{err}"
    );
    assert_no_partial_module(&f.modules);
}

#[test]
fn step_past_its_timeout_is_killed() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let steps = "      - name: slow\n        type: shell\n        stepTimeout: 5s\n        shell:\n          inline: \"sleep 600\\n\"\n";
    let f = failed_build(&kiln, "slow", steps);
    let err = &f.stderr;
    assert!(err.contains("'slow'") && err.contains("timeout"), "{err}");
    assert!(f.took < Duration::from_secs(400));
}

#[test]
fn ctrl_c_mid_build_leaves_no_vm_and_no_module() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let steps = "      - name: long\n        type: shell\n        shell:\n          inline: \"echo started-long-step; sleep 600\\n\"\n";
    let m = write_manifest(tmp.path(), "interrupted", &bootstrap_vm("box", steps));
    let modules = tmp.path().join("modules");
    let mut child = Command::new(&kiln)
        .args([
            "build",
            &m,
            "--no-cache",
            "--output",
            modules.to_str().unwrap(),
            "--json",
        ])
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("started-long-step") {
            seen = true;
            break;
        }
    }
    assert!(seen, "the long step never started");
    let qemu_before = qemu_children(child.id());
    assert!(!qemu_before.is_empty(), "no QEMU process found under kiln");
    // Ctrl-C.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success());
    for pid in qemu_before {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "QEMU {pid} survived the interrupt"
        );
    }
    assert!(!modules.join("interrupted").exists());
    assert_no_partial_module(&modules);
}

/// Pids of qemu-system processes whose parent is `parent`.
fn qemu_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses; ppid is the 2nd field after it.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if rest.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
            && stat.contains("(qemu-system-x86")
        {
            out.push(pid);
        }
    }
    out
}
