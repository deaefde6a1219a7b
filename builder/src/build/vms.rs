//! The module's VMs, built together: each on a thread of its own, under the build's
//! watchdog. One VM's failure, Ctrl-C or the build's timeout stops
//! all of them; the VM that failed first names the build's failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::barrier::StepsBarrier;
use super::error::BuildError;
use super::registry::VmRegistry;
use super::vm::{ModuleBuild, VmBuild};
use crate::events::BuildPhase;
use crate::module::VmRecord;

/// Builds every VM of the module with `build_vm`; their records in the manifest's order, or
/// the build's failure (reported as the build's `Failed` phase).
pub(super) fn build_all(
    m: &ModuleBuild,
    build_phase: &(dyn Fn(BuildPhase, Option<String>) + Sync),
    build_vm: fn(&VmBuild) -> Result<VmRecord, BuildError>,
) -> Result<Vec<VmRecord>, BuildError> {
    let timed_out = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = watchdog(m, timed_out.clone(), done.clone());

    let failed = AtomicBool::new(false);
    let capturing_once = AtomicBool::new(false);
    let barrier = StepsBarrier::new(m.job.vms.len());
    let results: Vec<Result<VmRecord, BuildError>> = std::thread::scope(|s| {
        let handles: Vec<_> = m
            .job
            .vms
            .iter()
            .enumerate()
            .map(|(index, vm)| {
                let (failed, barrier, capturing_once) = (&failed, &barrier, &capturing_once);
                s.spawn(move || {
                    let steps_done = || {
                        barrier.arrive_and_wait(&|| {
                            failed.load(Ordering::SeqCst) || m.ctx.cancel.load(Ordering::SeqCst)
                        })
                    };
                    let capturing = || {
                        if !capturing_once.swap(true, Ordering::SeqCst) {
                            build_phase(BuildPhase::CapturingDisks, None);
                        }
                    };
                    let r = build_vm(&VmBuild {
                        module: m,
                        vm,
                        index,
                        steps_done: &steps_done,
                        capturing: &capturing,
                        start: Instant::now(),
                    });
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                        // One failed VM fails the build: stop the others now.
                        m.ctx.cancel.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(BuildError::Panicked)))
            .collect()
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();

    let mut vms = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(v) => vms.push(v),
            // The VM that failed first names the failure; the others were stopped for it.
            Err(e) => {
                if matches!(first_err, None | Some(BuildError::Cancelled)) {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        build_phase(BuildPhase::Failed, Some(e.to_string()));
        if timed_out.load(Ordering::SeqCst) {
            return Err(BuildError::Timeout(m.job.timeout));
        }
        return Err(e);
    }
    Ok(vms)
}

/// Stops every VM once the build is cancelled or passes its timeout, until `done`.
fn watchdog(m: &ModuleBuild, timed_out: Arc<AtomicBool>, done: Arc<AtomicBool>) -> JoinHandle<()> {
    let (cancel, registry): (_, VmRegistry) = (m.ctx.cancel.clone(), m.ctx.registry.clone());
    let (start, limit) = (m.start, m.job.timeout);
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if start.elapsed() > limit {
                timed_out.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
            }
            if cancel.load(Ordering::SeqCst) {
                registry.kill_all();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}
