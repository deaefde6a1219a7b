//! Builds started from the page. Each build runs as a `kiln build --json` child process, not
//! on a thread of the server:
//! - the build keys its runtime folder (sockets, the handbuild resume flag) by process id
//!   and installs a process-wide Ctrl-C handler, so two builds in one process would collide;
//! - cancelling is the same SIGINT a user sends `kiln build` in a terminal, with the same
//!   cleanup (VMs stopped, no half module), and a crashing build cannot take the editor down;
//! - the child's `--json` events are exactly what `kiln build --json` prints, so the page
//!   shows the same stream scripts see.
//!
//! The server reads the child's events, keeps a small [`BuildState`] (phases, steps, a
//! handbuild pause) and a bounded log, and wakes the Server-Sent Events streams of the page.

mod run;
mod spawn;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use run::{BuildRun, Update};
pub use state::{BuildState, Pause, PhaseMark, Status, StepState, VmState};

use crate::plan_adapter::{load_job, LoadJobError};

/// Finished builds remembered for the page.
const KEEP_FINISHED: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BuildStartError {
    #[error("a build of {0} is running: cancel it or wait for it")]
    Busy(String),
    #[error(transparent)]
    Invalid(#[from] LoadJobError),
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BuildActionError {
    #[error("no build {0}")]
    NoBuild(u64),
    #[error("build {0} is not running")]
    NotRunning(u64),
    #[error("VM `{0}` is not paused at a handbuild step")]
    NotPaused(String),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error("cannot resume VM `{vm}`: {source}")]
    Resume {
        vm: String,
        #[source]
        source: std::io::Error,
    },
}

/// How builds are run.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The `kiln` program to run (`kiln build --json`).
    pub program: PathBuf,
    /// The modules folder (`--output`).
    pub output: PathBuf,
    /// The runtime folder (`KILN_RUN_DIR`): `<run_root>/<pid>/<vm>/resume` resumes a handbuild
    /// step, the same flag `kiln resume <vm>` writes.
    pub run_root: PathBuf,
}

/// The builds of one server: at most one runs at a time (a build already uses every core of
/// a small machine), the last few finished ones stay visible.
pub struct Builds {
    cfg: BuildConfig,
    list: Mutex<(u64, Vec<Arc<BuildRun>>)>,
}

impl Builds {
    pub fn new(cfg: BuildConfig) -> Builds {
        Builds {
            cfg,
            list: Mutex::new((0, Vec::new())),
        }
    }

    pub fn get(&self, id: u64) -> Result<Arc<BuildRun>, BuildActionError> {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.1.iter()
            .find(|b| b.id == id)
            .cloned()
            .ok_or(BuildActionError::NoBuild(id))
    }

    pub fn list(&self) -> Vec<BuildState> {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.1.iter().map(|b| b.snapshot()).collect()
    }

    /// Starts `kiln build --json` of the manifest file `path` (named `name` on the page).
    pub fn start(&self, name: &str, path: &Path) -> Result<Arc<BuildRun>, BuildStartError> {
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = l.1.iter().find(|b| !b.is_done()) {
            return Err(BuildStartError::Busy(b.snapshot().manifest));
        }
        // Load the job here too: a manifest that cannot build fails at once with kiln's
        // message, and the state lists every VM and step (and handbuild instructions) before
        // the first event.
        let job = load_job(path, &mut |_| {})?;
        l.0 += 1;
        let id = l.0;
        let run = Arc::new(BuildRun::new(id, name, job, self.cfg.run_root.clone()));
        spawn::spawn(&self.cfg, run.clone(), path)?;
        l.1.push(run.clone());
        while l.1.len() > KEEP_FINISHED + 1 {
            match l.1.iter().position(|b| b.is_done()) {
                Some(i) => {
                    l.1.remove(i);
                }
                None => break,
            }
        }
        Ok(run)
    }

    /// Asks every running build to stop (the server is shutting down).
    pub fn cancel_all(&self) {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        for b in l.1.iter().filter(|b| !b.is_done()) {
            let _ = b.cancel();
        }
    }
}
