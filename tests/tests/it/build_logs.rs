//! What a build leaves: a failed build keeps its logs (0600) where it says and `kiln logs`
//! shows them; start-up clean-up removes what killed kiln processes left, and only that.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use crate::build_common::*;

/// `kiln` with the test's own runtime folder and cache, from the repository root.
fn kiln_in(kiln: &Path, tmp: &Path, args: &[&str]) -> Output {
    run_kiln_with(
        kiln,
        args,
        &[
            ("KILN_RUN_DIR", &tmp.join("run")),
            ("KILN_CACHE", &tmp.join("cache")),
        ],
    )
}

/// The build id in "`kiln logs <id> [--output <dir>]` shows them".
fn kept_id(stderr: &str) -> String {
    let start = stderr
        .find("`kiln logs ")
        .unwrap_or_else(|| panic!("no `kiln logs` hint in: {stderr}"))
        + "`kiln logs ".len();
    let end = stderr[start..].find(['`', ' ']).unwrap() + start;
    stderr[start..end].to_string()
}

/// A pid no process has now.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn assert_owner_only(p: &Path) {
    let mode = std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
}

/// Kills and reaps a child when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// No guest needed: a raw `file:` source without a kernel fails the build right after the
/// partial module is made, which is enough for the clean-up and the kept logs.
#[test]
fn killed_builds_leftovers_are_removed_and_a_failed_builds_logs_kept() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::write(t.join("blank.raw"), vec![0u8; 1 << 20]).unwrap();
    let manifest = t.join("nokernel.yaml");
    std::fs::write(
        &manifest,
        format!(
            "vms:\n  - name: box\n    source:\n      file: {}\n    resources: {{ cpu: 1, memory: 1Gi }}\n    disks:\n      - name: root\n        size: 1Gi\n",
            t.join("blank.raw").display()
        ),
    )
    .unwrap();
    let modules = t.join("modules");
    let run = t.join("run");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(
        &run,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
    )
    .unwrap();
    // Left by killed kiln processes.
    let dead = dead_pid();
    let dead_partial = modules.join(format!(".web.partial-{dead}"));
    std::fs::create_dir_all(dead_partial.join("disks")).unwrap();
    std::fs::write(dead_partial.join("disks/root.qcow2"), b"half").unwrap();
    let dead_events = modules.join(format!(".web.events-{dead}.jsonl"));
    std::fs::write(&dead_events, b"{}\n").unwrap();
    let dead_run = run.join(dead.to_string());
    std::fs::create_dir_all(dead_run.join("box")).unwrap();
    // Owned by a live process: kept.
    let live = Reap(
        Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let live_partial = modules.join(format!(".db.partial-{}", live.0.id()));
    std::fs::create_dir_all(&live_partial).unwrap();
    let live_run = run.join(live.0.id().to_string());
    std::fs::create_dir_all(&live_run).unwrap();

    let out = kiln_in(
        &kiln,
        t,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!dead_partial.exists() && !dead_events.exists() && !dead_run.exists());
    assert!(
        err.contains(&format!("removed {}", dead_partial.display())),
        "{err}"
    );
    assert!(live_partial.exists() && live_run.exists());
    drop(live);

    // The failed build's logs, where it says.
    let id = kept_id(&err);
    assert!(id.starts_with("nokernel-"), "{id}");
    let kept = modules.join(".logs").join(&id);
    assert!(err.contains(&kept.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("kiln logs {id} --output {}`", modules.display())),
        "{err}"
    );
    let events = kept.join("events.jsonl");
    assert!(events.is_file());
    assert_owner_only(&events);
    assert_owner_only(&kept);
    assert!(!modules.join("nokernel").exists());
    // Nothing of this build is left half-written (only the live process's partial).
    std::fs::remove_dir(&live_partial).unwrap();
    assert_no_partial_module(&modules);
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        1,
        "only the live run"
    );

    for what in [id.as_str(), "nokernel"] {
        let out = kiln_in(
            &kiln,
            t,
            &["logs", what, "--output", modules.to_str().unwrap()],
        );
        assert!(out.status.success());
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains(&format!("build {id} (failed)")), "{s}");
        assert!(s.contains("phase=Failed"), "{s}");
    }
    let out = kiln_in(
        &kiln,
        t,
        &["logs", "--list", "--output", modules.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{id}\tfailed")));
    let out = kiln_in(
        &kiln,
        t,
        &["logs", "nothing", "--output", modules.to_str().unwrap()],
    );
    assert!(!out.status.success());
}

#[test]
fn convert_removes_only_unlocked_old_temporaries() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let out_dir = t.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let aged = |p: &PathBuf| {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
        let f = File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(600))
            .unwrap();
        f
    };
    let left = out_dir.join(".kiln-convert-left");
    let _ = aged(&left);
    // A convert still writing this one holds its lock.
    let held = out_dir.join(".kiln-convert-held");
    let held_file = aged(&held);
    held_file.try_lock().unwrap();
    // Just made, perhaps not locked yet: too young to judge.
    let young = out_dir.join(".kiln-convert-young");
    std::fs::write(&young, b"").unwrap();

    let dst = out_dir.join("dst.qcow2");
    let out = kiln_in(
        &kiln,
        t,
        &[
            "disk",
            "convert",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "-O",
            "qcow2",
            "--quiet",
        ],
    );
    assert!(out.status.success());
    assert!(dst.is_file());
    assert!(!left.exists());
    assert!(held.exists() && young.exists());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("removed {}", left.display())),
        "{err}"
    );
}

#[test]
fn a_failed_steps_output_is_kept_for_kiln_logs() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let manifest = t.join("failing.yaml");
    std::fs::write(
        &manifest,
        "vms:\n  - name: box\n    source:\n      bootstrap: { distro: debian, suite: bookworm, packages: [] }\n    resources: { cpu: 1, memory: 1Gi }\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n      - name: breaks\n        type: shell\n        shell:\n          inline: \"echo evidence-of-the-failure; exit 3\\n\"\n",
    )
    .unwrap();
    let modules = t.join("modules");
    // The bootstrap cache is shared with the other build tests (as they do), the runtime
    // folder is the test's own.
    let out = Command::new(&kiln)
        .args([
            "build",
            manifest.to_str().unwrap(),
            "--no-cache",
            "--output",
        ])
        .arg(&modules)
        .env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", t.join("run"))
        .current_dir(repo_root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success());
    assert!(!modules.join("failing").exists());
    assert_no_partial_module(&modules);
    let id = kept_id(&err);
    let kept = modules.join(".logs").join(&id);
    for f in ["events.jsonl", "box.log", "box-serial.log"] {
        let p = kept.join(f);
        assert!(p.is_file(), "{} is missing", p.display());
        assert_owner_only(&p);
    }
    let out = kiln_in(
        &kiln,
        t,
        &["logs", &id, "--output", modules.to_str().unwrap()],
    );
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("evidence-of-the-failure"), "{s}");
    assert!(s.contains("step output of box"), "{s}");
    assert!(
        s.contains(&kept.join("box-serial.log").display().to_string()),
        "{s}"
    );
}

#[test]
fn a_cancelled_builds_logs_are_kept_too() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let manifest = t.join("cancelled.yaml");
    std::fs::write(
        &manifest,
        "vms:\n  - name: box\n    source:\n      bootstrap: { distro: debian, suite: bookworm, packages: [] }\n    resources: { cpu: 1, memory: 1Gi }\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n      - name: long\n        type: shell\n        shell:\n          inline: \"echo started-the-long-step; sleep 600\\n\"\n",
    )
    .unwrap();
    let modules = t.join("modules");
    let mut child = Reap(
        Command::new(&kiln)
            .args([
                "build",
                manifest.to_str().unwrap(),
                "--json",
                "--no-cache",
                "--output",
            ])
            .arg(&modules)
            .env("KILN_NO_INTERNET", "true")
            .env("KILN_RUN_DIR", t.join("run"))
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let seen = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("started-the-long-step"));
    assert!(seen, "the long step never started");
    // Ctrl-C.
    Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let st = child.0.wait().unwrap();
    eprintln!("{err}");
    assert_eq!(st.code(), Some(130));
    assert!(!modules.join("cancelled").exists());
    let id = kept_id(&err);
    let kept = modules.join(".logs").join(&id);
    let step_log = std::fs::read_to_string(kept.join("box.log")).unwrap();
    assert!(step_log.contains("started-the-long-step"), "{step_log}");
    assert!(kept.join("events.jsonl").is_file());
    assert_no_partial_module(&modules);
}
