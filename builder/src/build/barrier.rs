//! The steps barrier: a VM shuts down for capture only once every VM of the module has
//! finished its steps.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// VMs shut down for capture only once every VM of the module has finished its steps: the
/// module's VMs are built together, so one may serve the others during their steps (a web
/// server for a client that fetches from it) and none is captured half-way through such an
/// exchange.
pub(super) struct StepsBarrier {
    done: Mutex<usize>,
    cv: Condvar,
    total: usize,
}

impl StepsBarrier {
    pub(super) fn new(total: usize) -> Self {
        StepsBarrier {
            done: Mutex::new(0),
            cv: Condvar::new(),
            total,
        }
    }

    /// Marks one VM done and waits for the others; `false` when `stop()` says the build is
    /// failing or cancelled instead.
    pub(super) fn arrive_and_wait(&self, stop: &dyn Fn() -> bool) -> bool {
        let mut n = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.cv.notify_all();
        while *n < self.total {
            if stop() {
                return false;
            }
            n = self
                .cv
                .wait_timeout(n, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    #[test]
    fn steps_barrier_waits_for_every_vm_and_a_stop_releases_it() {
        let b = StepsBarrier::new(2);
        let never = || false;
        std::thread::scope(|s| {
            let first = s.spawn(|| {
                let t = Instant::now();
                (b.arrive_and_wait(&never), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(b.arrive_and_wait(&never));
            let (ok, waited) = first.join().unwrap();
            assert!(ok);
            assert!(waited >= Duration::from_millis(250), "{waited:?}");
        });
        // One VM of two arrives, then the build fails: the wait ends with `false`.
        let b = StepsBarrier::new(2);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.arrive_and_wait(&|| stop.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::SeqCst);
            assert!(!waiter.join().unwrap());
        });
    }
}
