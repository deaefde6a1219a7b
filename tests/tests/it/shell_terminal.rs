//! `kiln shell` on a real terminal: hello built, cloned and run, then `kiln shell` started on
//! a pseudo-terminal of the test's own, as a user's terminal would run it: the prompt, the
//! window size, Ctrl-C reaching the guest's foreground job, the guest's exit code as kiln's,
//! and the terminal's settings restored afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::module::{clone_and_run, CloneExec};
use kiln_e2e::pty::{lflag, OnPty};
use kiln_e2e::screen::wait_for;

#[test]
fn kiln_shell_is_a_real_terminal() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    build_example(&kiln, "hello.yaml", &modules);
    let run_dir = tmp.path().join("run");
    let (run, addr) = clone_and_run(&CloneExec {
        kiln: &kiln,
        module: "hello",
        modules: &modules,
        clones: &tmp.path().join("clones"),
        count: None,
        vm: "hello",
        run_dir: &run_dir,
        env: &[],
    })
    .unwrap();

    let mut cmd = Command::new(&kiln);
    cmd.args(["shell", &addr])
        .env("KILN_RUN_DIR", &run_dir)
        .env("TERM", "xterm-256color");
    let mut term = OnPty::spawn(cmd, 30, 100);
    let cooked = lflag(&term.slave);
    assert_ne!(cooked & libc::ICANON, 0);
    let screen = term.screen.clone();

    // The guest's prompt (the clone may still be booting: kiln shell waits for its agent).
    let at = wait_for(&screen, 0, "root@", Duration::from_secs(300));
    // kiln put this terminal in raw mode while the shell runs.
    assert_eq!(
        lflag(&term.slave) & libc::ICANON,
        0,
        "the host terminal is not in raw mode"
    );
    term.type_(b"stty size\r");
    let at = wait_for(&screen, at, "30 100", Duration::from_secs(30));
    // Ctrl-C reaches the guest's foreground job, not kiln: the shell goes on.
    // The job says when it runs (then it is the foreground job): `sleep-5` is not in the
    // echo of the typed line.
    term.type_(b"sh -c 'echo sleep-$((2+3)); exec sleep 100'\r");
    let at = wait_for(&screen, at, "sleep-5", Duration::from_secs(30));
    let before = Instant::now();
    term.type_(&[0x03]);
    term.type_(b"echo after-$((6*7))\r");
    wait_for(&screen, at, "after-42", Duration::from_secs(30));
    assert!(before.elapsed() < Duration::from_secs(30));
    term.type_(b"exit 3\r");
    let status = term.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{status}");
    // Raw mode was undone on the way out.
    assert_eq!(
        lflag(&term.slave),
        cooked,
        "the host terminal's settings were not restored"
    );
    drop(run);
}
