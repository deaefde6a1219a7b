//! `--on-error ask` driven on a terminal, as a user would: a step fails, the shell opens in
//! the VM at that point, the fix made there, the step retried and the build finished. And
//! `kiln exec <build>/<vm>` reaching the VM of a build paused at a handbuild step, its stdin
//! forwarded.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::pty::OnPty;
use kiln_e2e::screen::wait_for;

const QUESTION: &str = "[r]etry step, [s]hell, [c]ontinue (skip the step), [a]bort? ";

/// A test's folder with its runtime folder, output and a manifest `<name>.yaml` of one
/// bootstrapped VM `box` with `steps`.
struct Setup {
    tmp: tempfile::TempDir,
    run_dir: PathBuf,
    modules: PathBuf,
    manifest: String,
}

fn setup(name: &str, steps: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = private_run_dir(tmp.path());
    let modules = tmp.path().join("modules");
    let manifest = write_manifest(tmp.path(), name, &bootstrap_vm("box", steps));
    Setup {
        tmp,
        run_dir,
        modules,
        manifest,
    }
}

#[test]
fn ask_is_refused_without_a_terminal() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(&kiln)
        .args([
            "build",
            "examples/hello.yaml",
            "--on-error",
            "ask",
            "--output",
        ])
        .arg(tmp.path().join("modules"))
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--on-error ask asks on the terminal, and this kiln's stdin is not one"),
        "{err}"
    );
    assert!(!tmp.path().join("modules").exists(), "the build started");
}

#[test]
fn ask_opens_a_shell_at_the_failed_step_and_retry_finishes_the_build() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    // In /root: a bootstrapped guest may still mount a fresh /tmp while the steps run.
    let steps = "      - { name: before, type: shell, shell: { inline: \"echo before-$((1+1)) > /root/before\" } }\n      - { name: check, type: shell, shell: { inline: \"test -f /root/fixed\" } }\n      - { name: after, type: shell, shell: { inline: \"echo after-the-$(cat /root/fixed)\" } }\n";
    let Setup {
        tmp: _tmp,
        run_dir,
        modules,
        manifest,
    } = setup("onerror-ask", steps);
    let mut cmd = Command::new(&kiln);
    cmd.args([
        "build",
        &manifest,
        "--no-cache",
        "--on-error",
        "ask",
        "--output",
    ])
    .arg(&modules)
    .env("KILN_NO_INTERNET", "true")
    .env("KILN_RUN_DIR", &run_dir)
    .env("TERM", "xterm-256color")
    .current_dir(repo_root());
    let start = Instant::now();
    let mut term = OnPty::spawn(cmd, 30, 100);
    let screen = term.screen.clone();

    let at = wait_for(&screen, 0, QUESTION, Duration::from_secs(600));
    let asked_after = start.elapsed();
    term.type_(b"s\r");
    // The shell is in the VM as the failed step left it: the first step's work is there.
    let at = wait_for(&screen, at, "root@", Duration::from_secs(120));
    term.type_(b"cat /root/before; echo fix > /root/fixed; exit\r");
    let at = wait_for(&screen, at, "before-2", Duration::from_secs(30));
    let at = wait_for(&screen, at, QUESTION, Duration::from_secs(60));
    term.type_(b"r\r");
    wait_for(&screen, at, "after-the-fix", Duration::from_secs(120));
    let status = term.wait_exit(Duration::from_secs(600));
    let text = term.text();
    eprintln!("{text}");
    assert!(status.success(), "{status}");
    assert!(modules.join("onerror-ask/module.yaml").is_file(), "{text}");
    // Asked once: the retried step passed.
    assert_eq!(text.matches(QUESTION).count(), 2, "{text}");
    eprintln!(
        "asked after {:.1}s, build done after {:.1}s",
        asked_after.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn exec_reaches_the_vm_of_a_paused_build_with_stdin() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let steps = "      - { name: wait, type: handbuild, handbuild: { instructions: \"Put /root/note in place.\" } }\n      - { name: check, type: shell, shell: { inline: \"grep -q 'from the host' /root/note\" } }\n";
    let Setup {
        tmp,
        run_dir,
        modules,
        manifest,
    } = setup("onerror-pause", steps);
    let log = tmp.path().join("build.log");
    let mut build = Command::new(&kiln)
        .args(["build", &manifest, "--no-cache", "--output"])
        .arg(&modules)
        .env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", &run_dir)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("kiln resume")
    {
        assert!(
            build.try_wait().unwrap().is_none(),
            "the build ended before its pause: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no pause within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let exec = |args: &[&str], input: &[u8]| {
        let mut c = Command::new(&kiln)
            .arg("exec")
            .args(args)
            .env("KILN_RUN_DIR", &run_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), input).unwrap();
        c.wait_with_output().unwrap()
    };
    let out = exec(
        &[
            "-i",
            "onerror-pause/box",
            "--",
            "sh",
            "-c",
            "cat > /root/note; tr a-z A-Z < /root/note",
        ],
        b"from the host\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "FROM THE HOST\n");
    // A VM the build does not have is refused, naming the build's VMs.
    let out = exec(&["onerror-pause/nope", "--", "true"], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("build `onerror-pause` has no VM named `nope` (its VMs: box)"),
        "{err}"
    );

    let resumed = run_kiln_with(&kiln, &["resume", "box"], &[("KILN_RUN_DIR", &run_dir)]);
    assert!(resumed.status.success());
    let ended = Instant::now();
    let status = loop {
        if let Some(st) = build.try_wait().unwrap() {
            break st;
        }
        if ended.elapsed() > Duration::from_secs(600) {
            let _ = build.kill();
            panic!("the build did not end within 10 minutes of its resume");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert!(modules.join("onerror-pause/module.yaml").is_file());
}

#[test]
fn abort_keeps_the_disks_where_it_says_until_the_next_build() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let steps = "      - { name: breaks, type: shell, shell: { inline: \"exit 4\" } }\n";
    let Setup {
        tmp,
        run_dir,
        modules,
        manifest,
    } = setup("onerror-abort", steps);
    let env = [("KILN_RUN_DIR", run_dir.as_path())];
    let out = run_kiln_with(
        &kiln,
        &[
            "build",
            &manifest,
            "--on-error",
            "abort",
            "--output",
            modules.to_str().unwrap(),
        ],
        &env,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let said = "--on-error abort: the VMs are stopped; their disks are kept in ";
    let at = err.find(said).unwrap_or_else(|| panic!("{err}")) + said.len();
    let work = std::path::PathBuf::from(err[at..].split(' ').next().unwrap());
    assert!(work.starts_with(&modules), "{}", work.display());
    let disks: Vec<_> = std::fs::read_dir(&work).unwrap().flatten().collect();
    assert!(
        disks
            .iter()
            .any(|d| d.file_name().to_string_lossy().ends_with(".qcow2")),
        "{disks:?}"
    );
    assert!(!modules.join("onerror-abort").exists());

    // The next build into the same output (one that fails before it boots) clears it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = write_manifest(
        tmp.path(),
        "dead",
        &format!(
            "vms:\n  - name: web\n    source:\n      url: http://127.0.0.1:{port}/disk.qcow2\n      checksum: sha256:{}\n    cloudInit: {{}}\n    resources: {{ cpu: 1, memory: 512Mi }}\n",
            "0".repeat(64)
        ),
    );
    let out = run_kiln_with(
        &kiln,
        &["build", &dead, "--output", modules.to_str().unwrap()],
        &env,
    );
    assert!(!out.status.success());
    assert!(!work.exists(), "{} is still there", work.display());
    assert_no_partial_module(&modules);
}
