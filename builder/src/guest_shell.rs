//! A login shell in a guest, on this process's terminal, through the guest's agent: for
//! `kiln shell` and for the shell `--on-error ask` opens at a failed step.

use std::io::Write;
use std::time::Duration;

use crate::raw_terminal;

/// The user's login shell on a terminal: raw mode here, the window size sent at the start
/// and on every SIGWINCH, bytes both ways.
pub fn on_terminal(
    c: &mut kiln_agent::Client,
    vm: &str,
) -> Result<kiln_agent::ExitStatus, kiln_agent::ClientError> {
    let size = raw_terminal::size(1);
    let term = std::env::var("TERM").unwrap_or_default();
    let req = kiln_agent::ExecRequest::login_shell(size).tty(kiln_agent::Tty { term, size });
    eprintln!("kiln shell: connected to {vm} (exit or Ctrl-D ends it)");
    raw_terminal::watch_resize();
    let _raw = raw_terminal::RawMode::enter(0).map_err(kiln_agent::ClientError::Send)?;
    let mut out = std::io::stdout().lock();
    c.exec_tty(
        &req,
        |mut input| {
            let mut buf = [0u8; 4096];
            while !input.done() {
                if raw_terminal::take_resize() && input.resize(raw_terminal::size(1)).is_err() {
                    return;
                }
                // A short wait, so the end of the command is seen promptly.
                if !raw_terminal::readable(0, Duration::from_millis(100)) {
                    continue;
                }
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // The terminal hung up: stop sending; the guest side ends on its own.
                    return;
                }
                if input.write(&buf[..n as usize]).is_err() {
                    return;
                }
            }
        },
        |d| {
            let _ = out.write_all(d);
            let _ = out.flush();
        },
    )
}
