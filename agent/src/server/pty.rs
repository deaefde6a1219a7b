//! Terminals for commands that ask for one: a pseudo-terminal pair, its window size, and
//! killing every process of a terminal's session (a shell's jobs lead process groups of
//! their own, which killing the shell's group would miss).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::message::WindowSize;

/// A new pseudo-terminal: the master (kept by the agent) and the slave (the command's
/// stdin, stdout and stderr), both close-on-exec; the slave is dup'd onto 0-2 by the spawn.
pub fn open(size: WindowSize) -> io::Result<(File, OwnedFd)> {
    // SAFETY: plain syscalls on a descriptor we own; ptsname_r writes into `name`, whose
    // length it is given.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = File::from_raw_fd(m);
        if libc::grantpt(m) < 0 || libc::unlockpt(m) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        let r = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = OwnedFd::from_raw_fd(s);
        set_size(&master, size)?;
        Ok((master, slave))
    }
}

/// Set the terminal's window size; the kernel sends the foreground process group SIGWINCH.
pub fn set_size(master: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ws is a valid winsize for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send `sig` to every process whose session is `sid` (the terminal command's own).
pub fn kill_session(sid: u32, sig: i32) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if session_of(pid) == Some(sid) {
            // SAFETY: plain syscall.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}

/// The session id of `pid`: field 6 of /proc/PID/stat, after the parenthesised name
/// (which may itself hold spaces and parentheses).
fn session_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session
    rest.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_terminal_has_the_size_asked_for() {
        let (m, s) = open(WindowSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: ws is a valid winsize to fill.
        assert_eq!(
            unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            0
        );
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
        set_size(&m, WindowSize { rows: 5, cols: 7 }).unwrap();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            0
        );
        assert_eq!((ws.ws_row, ws.ws_col), (5, 7));
    }

    #[test]
    fn the_session_of_this_process_is_read_from_proc() {
        // SAFETY: getsid(0) cannot fail for the calling process.
        let sid = unsafe { libc::getsid(0) } as u32;
        assert_eq!(session_of(std::process::id() as i32), Some(sid));
    }
}
