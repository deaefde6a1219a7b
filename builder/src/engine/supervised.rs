//! The state a VM's supervisor thread shares with its [`super::RunningVm`] handle: both
//! engines run one thread per VM that restarts the VM's process on guest reboots and records
//! how the VM ended, and the handle waits on that record.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `S` behind a lock, with a condition variable the supervisor signals on every change.
#[derive(Default)]
pub struct Supervised<S> {
    state: Mutex<S>,
    changed: Condvar,
}

impl<S> Supervised<S> {
    pub fn new(state: S) -> Self {
        Supervised {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// The state; a panicked holder does not make it unusable (the state stays consistent:
    /// every writer sets whole fields).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter: call after a change.
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for `ready` to find what it looks for in the state.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&S) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(t) = ready(&st) {
                return Some(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_waiter_sees_a_change_and_times_out_without_one() {
        let s = Arc::new(Supervised::new(None::<u32>));
        assert_eq!(s.wait_for(Duration::from_millis(50), |v| *v), None);
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            *s2.lock() = Some(7);
            s2.notify();
        });
        let start = Instant::now();
        assert_eq!(s.wait_for(Duration::from_secs(10), |v| *v), Some(7));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
