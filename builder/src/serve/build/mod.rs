//! Builds started from the page. Each build runs as a `kiln build --json` child process, not
//! on a thread of the server:
//! - the build keys its runtime folder (sockets, the handbuild resume flag) by process id
//!   and installs a process-wide Ctrl-C handler, so two builds in one process would collide;
//! - cancelling is the same SIGINT a user sends `kiln build` in a terminal, with the same
//!   cleanup (VMs stopped, no half module), and a crashing build cannot take the editor down;
//! - the child's `--json` events are exactly what `kiln build --json` prints, so the page
//!   shows the same stream scripts see.
//!
//!
//! Several builds may run at once (each child has its own runtime folder and module
//! partial, both named by its pid), but not two of one module: both would write it.
//!
//! The server reads the child's events, keeps a small [`BuildState`] (phases, steps, a
//! handbuild pause) and a bounded log, and wakes the Server-Sent Events streams of the page.

mod logs;
mod run;
mod spawn;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use logs::{send as send_log_file, LogFile, LogFileError, LogFolder};
pub use run::{BuildRun, Update};
pub use state::{BuildState, BuildSummary, Pause, PhaseMark, Status, StepState, VmState};

use crate::plan_adapter::{load_job, LoadJobError};

/// Finished builds remembered for the page (each keeps at most a little log: see
/// [`run`]); running ones are always kept.
const KEEP_FINISHED: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum BuildStartError {
    #[error(
        "build {id} of {manifest} is writing module `{module}` now: cancel it or wait for it \
         (two builds of one module would write the same folder)"
    )]
    Busy {
        id: u64,
        manifest: String,
        module: String,
    },
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
    /// `kiln serve --no-cache`: builds run every step (`kiln build --no-cache`).
    pub no_cache: bool,
}

/// The builds of one server: any number running (one per module), the last
/// [`KEEP_FINISHED`] finished ones remembered.
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

    /// Every build remembered, oldest first.
    pub fn list(&self) -> Vec<BuildSummary> {
        let l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.1.iter().map(|b| b.snapshot().summary()).collect()
    }

    /// The modules folder builds write to.
    pub fn output(&self) -> &Path {
        &self.cfg.output
    }

    /// Starts `kiln build --json` of the manifest file `path` (named `name` on the page).
    pub fn start(&self, name: &str, path: &Path) -> Result<Arc<BuildRun>, BuildStartError> {
        // Load the job here too: a manifest that cannot build fails at once with kiln's
        // message, and the state lists every VM and step (and handbuild instructions) before
        // the first event. It also names the module, which decides what may run together.
        let job = load_job(path, &mut |_| {})?;
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let same =
            l.1.iter().map(|b| b.snapshot()).find(|s| {
                s.status == Status::Running && (s.module == job.name || s.manifest == name)
            });
        if let Some(s) = same {
            return Err(BuildStartError::Busy {
                id: s.id,
                manifest: s.manifest,
                module: s.module,
            });
        }
        l.0 += 1;
        let id = l.0;
        let run = Arc::new(BuildRun::new(id, name, job, self.cfg.run_root.clone()));
        spawn::spawn(&self.cfg, run.clone(), path)?;
        l.1.push(run.clone());
        // Forget the oldest finished builds beyond the bound; running ones stay.
        let mut finished = l.1.iter().filter(|b| b.is_done()).count();
        while finished > KEEP_FINISHED {
            match l.1.iter().position(|b| b.is_done()) {
                Some(i) => {
                    l.1.remove(i);
                    finished -= 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, Instant};

    const MANIFEST: &str = "vms:
  - name: v
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 1, memory: 512Mi }
";

    /// Builds whose `kiln` is a program that waits until cancelled.
    fn builds(t: &Path) -> Builds {
        let program = t.join("fake-kiln");
        std::fs::write(&program, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        for n in ["a.yaml", "b.yaml"] {
            std::fs::write(t.join(n), MANIFEST).unwrap();
        }
        Builds::new(BuildConfig {
            program,
            output: t.join("modules"),
            run_root: t.join("run"),
            no_cache: false,
        })
    }

    #[test]
    fn builds_of_different_modules_run_together_and_of_one_module_do_not() {
        let t = tempfile::tempdir().unwrap();
        let b = builds(t.path());
        let a1 = b.start("a.yaml", &t.path().join("a.yaml")).unwrap();
        match b.start("a.yaml", &t.path().join("a.yaml")) {
            Err(e @ BuildStartError::Busy { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("module `a`") && msg.contains("build 1"),
                    "{msg}"
                );
            }
            other => panic!("a second build of a.yaml: {:?}", other.map(|r| r.id)),
        }
        let b1 = b.start("b.yaml", &t.path().join("b.yaml")).unwrap();
        let list = b.list();
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|s| s.status == Status::Running));
        assert_eq!(
            (list[0].module.as_str(), list[1].module.as_str()),
            ("a", "b")
        );
        assert_eq!(list[1].vms[0].name, "v");
        // Once a's build ended, a may build again; b still runs.
        a1.cancel().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while !a1.is_done() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(a1.snapshot().status, Status::Cancelled);
        assert!(b.list()[0].ended_at.is_some());
        let a2 = b.start("a.yaml", &t.path().join("a.yaml")).unwrap();
        assert_eq!(a2.id, 3);
        assert!(!b1.is_done());
        b.cancel_all();
    }

    #[test]
    fn finished_builds_are_remembered_up_to_a_bound() {
        let t = tempfile::tempdir().unwrap();
        let b = builds(t.path());
        for _ in 0..KEEP_FINISHED + 3 {
            let r = b.start("a.yaml", &t.path().join("a.yaml")).unwrap();
            r.cancel().unwrap();
            let until = Instant::now() + Duration::from_secs(20);
            while !r.is_done() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(r.is_done());
        }
        let running = b.start("b.yaml", &t.path().join("b.yaml")).unwrap();
        let list = b.list();
        assert_eq!(list.len(), KEEP_FINISHED + 1);
        assert_eq!(list.last().map(|s| s.id), Some(running.id));
        b.cancel_all();
    }
}
