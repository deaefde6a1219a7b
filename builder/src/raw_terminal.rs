//! The host's side of `kiln shell` on a terminal: raw mode (every key goes to the guest,
//! Ctrl-C included), restored on every way out; the window size; SIGWINCH.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_agent::WindowSize;

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only looks at the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's size, or 24x80 when it does not say.
pub fn size(fd: RawFd) -> WindowSize {
    // SAFETY: ws is a valid winsize for the kernel to fill.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        WindowSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        WindowSize { rows: 24, cols: 80 }
    }
}

/// Raw mode on a terminal while this lives; the old settings come back when it is dropped
/// (a panic unwinds through it too).
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    pub fn enter(fd: RawFd) -> std::io::Result<RawMode> {
        // SAFETY: termios is plain data for tcgetattr to fill; cfmakeraw edits a copy.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSADRAIN, &raw) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved);
        }
    }
}

static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

/// Notes SIGWINCH from now on (the handler only sets a flag); see [`take_resize`].
pub fn watch_resize() {
    // SAFETY: the handler is async-signal-safe (one atomic store).
    unsafe {
        libc::signal(
            libc::SIGWINCH,
            on_winch as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// Whether the window changed size since the last call.
pub fn take_resize() -> bool {
    RESIZED.swap(false, Ordering::SeqCst)
}

/// Waits up to `t` for `fd` to be readable (a signal ends the wait early).
pub fn readable(fd: RawFd, t: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, t.as_millis() as libc::c_int) };
    r > 0 && p.revents != 0
}
