//! The processes `kiln serve` starts (`kiln build`, `kiln run`): each in its own process group,
//! so a Ctrl-C meant for the server reaches it only through the parent-death signal, once.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Sets `cmd` up to run in its own process group and get SIGINT when the server dies.
pub(super) fn interrupted_with_server(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
