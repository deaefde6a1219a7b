//! `kiln shell` on a real terminal: hello built, cloned and run, then `kiln shell` started on
//! a pseudo-terminal of the test's own, as a user's terminal would run it: the prompt, the
//! window size, Ctrl-C reaching the guest's foreground job, the guest's exit code as kiln's,
//! and the terminal's settings restored afterwards.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::module::{clone_and_run, CloneExec};
use kiln_e2e::screen::wait_for;

/// A pseudo-terminal pair of the given size: (master, slave).
fn openpty(rows: u16, cols: u16) -> (File, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two descriptors; the name and termios are not asked for.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both are fresh descriptors this test now owns.
    unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

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

    let (master, slave) = openpty(30, 100);
    let cooked = lflag(&slave);
    assert_ne!(cooked & libc::ICANON, 0);
    let mut cmd = Command::new(&kiln);
    cmd.args(["shell", &addr])
        .env("KILN_RUN_DIR", &run_dir)
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: setsid and the TIOCSCTTY ioctl are async-signal-safe; the slave is on fd 0.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("starting kiln shell");
    let screen = Arc::new(Mutex::new(Vec::new()));
    let mut reader = master.try_clone().unwrap();
    let s2 = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut keys = master;
    let mut type_ = |s: &[u8]| keys.write_all(s).unwrap();

    // The guest's prompt (the clone may still be booting: kiln shell waits for its agent).
    let at = wait_for(&screen, 0, "root@", Duration::from_secs(300));
    // kiln put this terminal in raw mode while the shell runs.
    assert_eq!(
        lflag(&slave) & libc::ICANON,
        0,
        "the host terminal is not in raw mode"
    );
    type_(b"stty size\r");
    let at = wait_for(&screen, at, "30 100", Duration::from_secs(30));
    // Ctrl-C reaches the guest's foreground job, not kiln: the shell goes on.
    // The job says when it runs (then it is the foreground job): `sleep-5` is not in the
    // echo of the typed line.
    type_(b"sh -c 'echo sleep-$((2+3)); exec sleep 100'\r");
    let at = wait_for(&screen, at, "sleep-5", Duration::from_secs(30));
    let before = Instant::now();
    type_(&[0x03]);
    type_(b"echo after-$((6*7))\r");
    wait_for(&screen, at, "after-42", Duration::from_secs(30));
    assert!(before.elapsed() < Duration::from_secs(30));
    type_(b"exit 3\r");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kiln shell did not end after `exit 3`"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(3), "{status}");
    // Raw mode was undone on the way out.
    assert_eq!(
        lflag(&slave),
        cooked,
        "the host terminal's settings were not restored"
    );
    drop(run);
}
