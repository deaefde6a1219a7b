//! The build's state as the phases see it: what the module's VMs share ([`ModuleBuild`]) and
//! one VM's build ([`VmBuild`]): the job's VM, where its files go, its events and its clock.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::error::{BuildError, VmError};
use super::options::{BuildContext, BuildOptions};
use crate::engine::Engine;
use crate::events::{ms, Event, EventSink, VmPhase};
use crate::job::{BuildJob, VmJob};
use crate::module::PendingModule;

/// What every VM of the module shares.
pub(super) struct ModuleBuild<'a> {
    pub job: &'a BuildJob,
    pub opts: &'a BuildOptions,
    pub ctx: &'a BuildContext,
    pub engine: &'a dyn Engine,
    pub net: &'a kiln_net::Network,
    pub pending: &'a PendingModule,
    pub run_dir: &'a Path,
    /// When the build's attempt started: its timeout counts from here.
    pub start: Instant,
}

pub(super) struct VmBuild<'a> {
    /// What every VM of the module shares: the job, the options, the engine, the network,
    /// the module being written.
    pub module: &'a ModuleBuild<'a>,
    pub vm: &'a VmJob,
    /// The VM's place in the module; its vsock CID follows from it.
    pub index: usize,
    /// Waits until every VM of the module has finished its steps; `false` when the build
    /// fails or is cancelled instead.
    pub steps_done: &'a (dyn Fn() -> bool + Sync),
    /// Tells the module that this VM's capture starts.
    pub capturing: &'a (dyn Fn() + Sync),
    pub start: Instant,
}

impl VmBuild<'_> {
    pub fn events(&self) -> &dyn EventSink {
        self.module.ctx.events.as_ref()
    }

    pub fn phase(&self, phase: VmPhase, message: Option<String>) {
        self.events().emit(&Event::Vm {
            vm: self.vm.name.clone(),
            phase,
            elapsed_ms: ms(self.start.elapsed()),
            message,
        })
    }

    pub fn note(&self, message: String) {
        self.events().emit(&Event::Note {
            vm: Some(self.vm.name.clone()),
            message,
        });
    }

    pub fn cancelled(&self) -> bool {
        self.module.ctx.cancel.load(Ordering::SeqCst)
    }

    /// Reports the VM failed with `e`.
    pub fn fail(&self, e: VmError) -> BuildError {
        self.phase(VmPhase::Failed, Some(e.to_string()));
        BuildError::Vm {
            vm: self.vm.name.clone(),
            source: Box::new(e),
        }
    }

    /// Where the VM's disks are made before capture (inside the partial module).
    pub fn work_dir(&self) -> PathBuf {
        self.module.pending.dir().join("work")
    }

    /// The VM's runtime folder (its sockets, its resume flag).
    pub fn runtime_dir(&self) -> PathBuf {
        self.module.run_dir.join(&self.vm.name)
    }

    pub fn serial_log(&self) -> PathBuf {
        self.module
            .pending
            .dir()
            .join("logs")
            .join(format!("{}-serial.log", self.vm.name))
    }

    /// The VM's own log: its steps' output.
    pub fn step_log(&self) -> PathBuf {
        self.module
            .pending
            .dir()
            .join("logs")
            .join(format!("{}.log", self.vm.name))
    }
}
