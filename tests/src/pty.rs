//! A program run on a pseudo-terminal of the test's own, as on a user's terminal: its
//! controlling terminal, what it prints collected as the screen, keys typed to it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pseudo-terminal pair of the given size: (master, slave).
pub fn openpty(rows: u16, cols: u16) -> (File, OwnedFd) {
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

/// The terminal's local modes (`ICANON` and the like).
pub fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// A program running on a pseudo-terminal.
pub struct OnPty {
    pub child: Child,
    /// Everything the program printed so far (see [`crate::screen::wait_for`]).
    pub screen: Arc<Mutex<Vec<u8>>>,
    /// The terminal's program side, to look at its modes.
    pub slave: OwnedFd,
    keys: File,
}

impl OnPty {
    /// Starts `cmd` with a new session whose controlling terminal is a fresh
    /// `rows` x `cols` pseudo-terminal on its stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> OnPty {
        let (master, slave) = openpty(rows, cols);
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
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
        let child = cmd
            .spawn()
            .expect("starting the program on a pseudo-terminal");
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
        OnPty {
            child,
            screen,
            slave,
            keys: master,
        }
    }

    /// Types `keys` on the terminal.
    pub fn type_(&mut self, keys: &[u8]) {
        self.keys.write_all(keys).unwrap();
    }

    /// Waits for the program to end; panics (the test fails) after `within`, showing what
    /// it printed.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < within,
                "the program did not end within {within:?}; the terminal shows {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the program printed, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }
}

impl Drop for OnPty {
    fn drop(&mut self) {
        // A test that failed halfway leaves no program behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
