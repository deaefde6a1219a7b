//! The CPU share of build steps against the rest of the guest.
//!
//! The agent answers early in the boot, so the first steps run while the guest is still
//! starting units and udev is still loading modules; on one emulated vCPU they used to get
//! about half of it. Linux groups the processes of each session for the scheduler
//! (autogroups, `CONFIG_SCHED_AUTOGROUP`, on while no cgroup CPU controller is enabled, as
//! under a default systemd), and a group's share can be raised through
//! `/proc/<pid>/autogroup`. The agent raises its own session's group, which its root steps
//! share (they are only put in their own process group), and the new session of each step
//! run as another user. A step that waits for the boot (a socket, `systemctl --wait`) sleeps
//! and leaves the CPU to it, so nothing is starved; what the raise changes is which side
//! runs first. The task nice values the steps see stay 0. The unit asks for -10: weight
//! 9548 against 1024 for a group at 0, about 90 % of a contended CPU.

use std::io::{self, Write};

/// Set the calling process's autogroup nice.
pub fn raise_own(nice: i32) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/autogroup")?
        .write_all(nice.to_string().as_bytes())
}

/// What a child needs to raise its own new session's group between fork and exec, built
/// before the fork so the child only makes open/write/close syscalls.
pub struct ChildRaise {
    path: std::ffi::CString,
    value: Vec<u8>,
}

impl ChildRaise {
    pub fn new(nice: i32) -> ChildRaise {
        ChildRaise {
            path: c"/proc/self/autogroup".to_owned(),
            value: nice.to_string().into_bytes(),
        }
    }

    /// Called in the child after setsid(2). Failure is ignored: the step runs regardless,
    /// at the ordinary share.
    pub fn apply(&self) {
        // SAFETY: open/write/close are async-signal-safe; the path is a valid C string and
        // the buffer outlives the calls.
        unsafe {
            let fd = libc::open(self.path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, self.value.as_ptr().cast(), self.value.len());
                libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the line `/autogroup-N nice V` that `/proc/<pid>/autogroup` reads.
    fn parse_autogroup(line: &str) -> Option<i32> {
        line.split_whitespace()
            .skip_while(|w| *w != "nice")
            .nth(1)?
            .parse()
            .ok()
    }

    #[test]
    fn autogroup_lines_parse() {
        assert_eq!(parse_autogroup("/autogroup-42 nice -10\n"), Some(-10));
        assert_eq!(parse_autogroup("/autogroup-1 nice 0"), Some(0));
        assert_eq!(parse_autogroup("garbage"), None);
    }

    #[test]
    fn a_child_raises_its_own_new_session_only() {
        let Ok(own) = std::fs::read_to_string("/proc/self/autogroup") else {
            eprintln!("SKIP: this kernel has no autogroups (/proc/self/autogroup)");
            return;
        };
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: raising an autogroup needs root (CAP_SYS_NICE)");
            return;
        }
        let raise = ChildRaise::new(-5);
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/autogroup");
        // SAFETY: the hook only calls setsid(2) and ChildRaise::apply, both async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                raise.apply();
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let child = String::from_utf8_lossy(&out.stdout);
        assert_eq!(parse_autogroup(&child), Some(-5), "{child}");
        // The test's own group is untouched.
        let after = std::fs::read_to_string("/proc/self/autogroup").unwrap();
        assert_eq!(parse_autogroup(&after), parse_autogroup(&own));
    }
}
