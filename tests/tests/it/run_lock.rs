//! `kiln run` keeps a clone to one run at a time with a lock that dies with the process: a
//! second run of a running clone is refused with the holder's pid, and after the run is
//! killed (SIGKILL: no clean-up of its own) the clone runs again.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::build_common::*;

/// Kills and reaps a child when dropped (SIGINT first, like Ctrl-C).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kiln(kiln: &Path, run_dir: &Path) -> Command {
    let mut c = Command::new(kiln);
    c.env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", run_dir)
        .current_dir(repo_root());
    c
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

#[test]
fn a_killed_run_leaves_no_lock_and_a_live_one_refuses_a_second() {
    let Some(bin) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run_dir = t.join("run");
    let manifest = t.join("locked.yaml");
    std::fs::write(
        &manifest,
        "vms:\n  - name: box\n    source:\n      bootstrap: { distro: debian, suite: bookworm, packages: [] }\n    resources: { cpu: 1, memory: 1Gi }\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n      - name: mark\n        type: shell\n        shell:\n          inline: \"echo marked > /etc/kiln-mark\\n\"\n",
    )
    .unwrap();
    let modules = t.join("modules");
    let clones = t.join("clones");
    let st = kiln(&bin, &run_dir)
        .args(["build", "--no-cache"])
        .arg(&manifest)
        .arg("--output")
        .arg(&modules)
        .status()
        .unwrap();
    assert!(st.success(), "kiln build failed");
    let st = kiln(&bin, &run_dir)
        .args(["clone", "locked", "--modules"])
        .arg(&modules)
        .arg("--clones")
        .arg(&clones)
        .status()
        .unwrap();
    assert!(st.success(), "kiln clone failed");

    let start_run = || {
        Reap(
            kiln(&bin, &run_dir)
                .args(["run", "locked-1", "--clones"])
                .arg(&clones)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let sock = run_dir.join("clones/locked-1/box/vsock.sock");
    let mut first = start_run();
    assert!(
        wait_for(&sock, Duration::from_secs(60)),
        "the first run never made its socket"
    );
    // Well past the VM's launch.
    std::thread::sleep(Duration::from_secs(3));

    // A second run while the first lives: refused, naming the first.
    let second = kiln(&bin, &run_dir)
        .args(["run", "locked-1", "--clones"])
        .arg(&clones)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    eprintln!("second run: {err}");
    assert!(!second.status.success());
    assert!(
        err.contains("already running") && err.contains(&format!("pid {}", first.0.id())),
        "{err}"
    );

    // SIGKILL: the run cleans nothing up; its VM dies with it.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(first);

    // The clone runs again and its VM answers (once the new run has made its own socket:
    // a new socket may reuse the freed inode number, so its change time tells them apart).
    let identity = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
            .ok()
    };
    let old_ino = identity(&sock);
    let mut third = start_run();
    let t0 = Instant::now();
    loop {
        let ino = identity(&sock);
        if ino.is_some() && ino != old_ino {
            break;
        }
        if let Ok(Some(st)) = third.0.try_wait() {
            panic!("the run after the killed one ended: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run after the killed one never made its socket"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let exec = kiln(&bin, &run_dir)
        .args([
            "exec",
            "--wait-secs",
            "240",
            "locked-1/box",
            "--",
            "cat",
            "/etc/kiln-mark",
        ])
        .output()
        .unwrap();
    eprintln!("exec stderr: {}", String::from_utf8_lossy(&exec.stderr));
    assert!(exec.status.success());
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "marked");
}
