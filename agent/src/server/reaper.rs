//! When the agent is PID 1 (tiny test guests boot it as init), orphaned processes are
//! re-parented to it and must be reaped, or they stay zombies. The agent's own commands are
//! reaped by their waiter threads, so the reaper only peeks (WNOWAIT) and leaves those alone.

use std::sync::Mutex;
use std::time::Duration;

/// Pids of commands whose waiter thread will reap them.
static TRACKED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn tracked() -> std::sync::MutexGuard<'static, Vec<u32>> {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `spawn` with the tracked set locked and record the pid it returns, so the reaper
/// can never take a command that exits at once.
pub fn spawn_tracked<T>(spawn: impl FnOnce() -> Option<(u32, T)>) -> Option<T> {
    let mut t = tracked();
    let (pid, v) = spawn()?;
    t.push(pid);
    Some(v)
}

/// The command has been reaped by its waiter.
pub fn untrack(pid: u32) {
    tracked().retain(|p| *p != pid);
}

/// Start the reaper thread when this process is PID 1.
pub fn start_if_init() {
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } != 1 {
        return;
    }
    let r = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            // SAFETY: siginfo_t is plain data that waitid fills.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: info is valid and writable; WNOWAIT leaves the child waitable.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                // ECHILD: no children at all right now.
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            // SAFETY: waitid succeeded for a child, so the pid field is set.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 || tracked().contains(&(pid as u32)) {
                // One of ours: its waiter reaps it; look again shortly.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // SAFETY: reaping a specific exited child; a null status pointer is allowed.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        });
    if let Err(e) = r {
        tracing::warn!("cannot start the zombie reaper: {e}");
    }
}
