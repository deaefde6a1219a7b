//! Named points in time during a VM's start-up, for the start-up breakdown the benchmark
//! prints. Times are CLOCK_MONOTONIC nanoseconds, the clock every process on the host
//! shares, so a parent can line the VMM child's marks up with its own `spawn` time.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One mark: what had just finished, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub at_ns: u64,
}

/// Marks shared by the threads that set a VM up (the VM's own setup threads mark too).
#[derive(Debug, Clone, Default)]
pub struct Phases(Arc<Mutex<Vec<Phase>>>);

impl Phases {
    pub fn new() -> Phases {
        Phases::default()
    }

    /// Record that `name` finished now.
    pub fn mark(&self, name: &str) {
        self.mark_at(name, monotonic_ns());
    }

    pub fn mark_at(&self, name: &str, at_ns: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Phase {
                name: name.to_string(),
                at_ns,
            });
    }

    /// The marks so far, in time order.
    pub fn snapshot(&self) -> Vec<Phase> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by_key(|p| p.at_ns);
        v
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The CLOCK_MONOTONIC time of an earlier `Instant` (Rust's `Instant` is CLOCK_MONOTONIC
/// on Linux but has no public conversion).
pub fn instant_to_ns(t: std::time::Instant) -> u64 {
    let now_ns = monotonic_ns();
    let ago = std::time::Instant::now()
        .saturating_duration_since(t)
        .as_nanos() as u64;
    now_ns.saturating_sub(ago)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_come_back_in_time_order() {
        let p = Phases::new();
        p.mark_at("b", 20);
        p.mark_at("a", 10);
        let q = p.clone();
        std::thread::spawn(move || q.mark_at("c", 30))
            .join()
            .unwrap();
        let names: Vec<_> = p.snapshot().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn instants_convert_to_the_monotonic_clock() {
        let before = monotonic_ns();
        let t = std::time::Instant::now();
        let after = monotonic_ns();
        let ns = instant_to_ns(t);
        // Allow the two clock reads in instant_to_ns some slack.
        assert!(ns + 1_000_000 >= before && ns <= after + 1_000_000);
    }
}
