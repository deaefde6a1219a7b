//! Clones started from the page: each is `kiln run <clone>` in a child of `kiln serve` (the
//! same binary), its output in a log under the serve's runtime folder. A child lives on a
//! thread of its own for exactly as long as it runs, so the parent-death signal (which follows
//! the spawning thread) reaches it only if the server dies: a clone never outlives its server.
//! Stopping sends SIGINT, `kiln run`'s Ctrl-C: it powers the VMs off and removes its runtime
//! folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a stopped clone's `kiln run` gets to power its VMs off before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How much of a run's log a clone's state carries.
const LOG_TAIL: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("clone `{0}` is running: stop it first")]
    Running(String),
    #[error("clone `{0}` is not running")]
    NotRunning(String),
    #[error(
        "clone `{0}` was started outside kiln serve: stop it where it runs (Ctrl-C in its \
         kiln run)"
    )]
    NotOurs(String),
    #[error("creating the log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start kiln run: {0}")]
    Spawn(#[source] std::io::Error),
}

impl RunError {
    pub fn status(&self) -> u16 {
        match self {
            RunError::Running(_) | RunError::NotRunning(_) | RunError::NotOurs(_) => 409,
            RunError::Log { .. } | RunError::Spawn(_) => 500,
        }
    }
}

pub struct RunConfig {
    /// The `kiln` program (`kiln run`).
    pub program: PathBuf,
    /// The clones folder (`kiln run --clones`).
    pub clones: PathBuf,
    /// The runtime root (`KILN_RUN_DIR`): running clones' VMs are under `clones/<clone>/<vm>`.
    pub run_root: PathBuf,
}

/// One `kiln run` child.
struct Child {
    pid: u32,
    log: PathBuf,
    /// `None` while it runs; then how it ended.
    exit: Mutex<Option<String>>,
    ended: Condvar,
}

impl Child {
    fn exit(&self) -> MutexGuard<'_, Option<String>> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits at most `t` for the child to end; whether it has.
    fn wait(&self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        let mut exit = self.exit();
        while exit.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            exit = self
                .ended
                .wait_timeout(exit, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// A clone's run as the page shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// `running` (a VM answers on its socket), `starting` (our child runs, no VM yet),
    /// or `stopped`.
    pub state: &'static str,
    /// The VMs running now.
    pub running_vms: Vec<String>,
    /// Started by this server (it can stop it).
    pub ours: bool,
    /// How this server's last run of it ended.
    pub exit: Option<String>,
    /// The end of that run's log.
    pub log: Option<String>,
}

pub struct CloneRuns {
    cfg: RunConfig,
    children: Mutex<HashMap<String, Arc<Child>>>,
}

impl CloneRuns {
    pub fn new(cfg: RunConfig) -> CloneRuns {
        CloneRuns {
            cfg,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn children(&self) -> MutexGuard<'_, HashMap<String, Arc<Child>>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn child(&self, clone: &str) -> Option<Arc<Child>> {
        self.children().get(clone).cloned()
    }

    /// The VMs of `clone` (named `vms`) that run now, as `kiln exec` finds them: a socket
    /// under the runtime root, and the clone's run lock naming a live process (a run killed
    /// with SIGKILL leaves its socket behind).
    pub fn running_vms(&self, clone: &str, vms: &[String]) -> Vec<String> {
        let holder =
            std::fs::read_to_string(self.cfg.clones.join(clone).join(crate::run_lock::LOCK_FILE))
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
        if !holder.is_some_and(crate::leftovers::pid_alive) {
            return Vec::new();
        }
        let dir = self.cfg.run_root.join("clones").join(clone);
        vms.iter()
            .filter(|v| crate::engine::vsock_uds(&dir.join(v)).exists())
            .cloned()
            .collect()
    }

    pub fn state(&self, clone: &str, vms: &[String]) -> RunState {
        let running_vms = self.running_vms(clone, vms);
        let child = self.child(clone);
        let exit = child.as_ref().and_then(|c| c.exit().clone());
        let alive = child.is_some() && exit.is_none();
        let state = match (running_vms.is_empty(), alive) {
            (false, _) => "running",
            (true, true) => "starting",
            (true, false) => "stopped",
        };
        RunState {
            state,
            running_vms,
            ours: alive,
            exit,
            log: child.map(|c| tail(&c.log)),
        }
    }

    /// Whether `clone` runs, by this server or another process.
    pub fn is_running(&self, clone: &str, vms: &[String]) -> bool {
        self.state(clone, vms).state != "stopped"
    }

    /// Starts `kiln run` of `clone` (its folder must exist; the caller checked the name).
    pub fn start(&self, clone: &str, vms: &[String]) -> Result<(), RunError> {
        let mut children = self.children();
        let ours = children.get(clone).is_some_and(|c| c.exit().is_none());
        if ours || !self.running_vms(clone, vms).is_empty() {
            return Err(RunError::Running(clone.into()));
        }
        let logs = self
            .cfg
            .run_root
            .join(format!("serve-{}", std::process::id()))
            .join("clones");
        let log = logs.join(format!("{clone}.log"));
        let log_err = |source| RunError::Log {
            path: log.clone(),
            source,
        };
        std::fs::create_dir_all(&logs).map_err(log_err)?;
        // 0600: the guest's output may show secrets.
        let out = crate::log_file::create(&log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let mut cmd = Command::new(&self.cfg.program);
        cmd.arg("run")
            .arg("--clones")
            .arg(&self.cfg.clones)
            .arg(clone)
            .env(crate::runtime::ENV, &self.cfg.run_root)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        super::child::interrupted_with_server(&mut cmd);
        let (tx, rx) = std::sync::mpsc::channel::<Result<Arc<Child>, std::io::Error>>();
        let log_path = log.clone();
        std::thread::Builder::new()
            .name(format!("run-{clone}"))
            .spawn(move || {
                let mut proc = match cmd.spawn() {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let child = Arc::new(Child {
                    pid: proc.id(),
                    log: log_path,
                    exit: Mutex::new(None),
                    ended: Condvar::new(),
                });
                let _ = tx.send(Ok(child.clone()));
                let how = match proc.wait() {
                    Ok(st) => st.to_string(),
                    Err(e) => format!("unknown: {e}"),
                };
                *child.exit() = Some(how);
                child.ended.notify_all();
            })
            .map_err(RunError::Spawn)?;
        let child = rx
            .recv()
            .map_err(|_| RunError::Spawn(std::io::ErrorKind::BrokenPipe.into()))?
            .map_err(RunError::Spawn)?;
        children.insert(clone.into(), child);
        Ok(())
    }

    /// Stops this server's run of `clone` and waits for it to end.
    pub fn stop(&self, clone: &str, vms: &[String]) -> Result<(), RunError> {
        let child = self.child(clone).filter(|c| c.exit().is_none());
        let Some(child) = child else {
            return Err(if self.running_vms(clone, vms).is_empty() {
                RunError::NotRunning(clone.into())
            } else {
                RunError::NotOurs(clone.into())
            });
        };
        signal(child.pid, libc::SIGINT);
        if !child.wait(STOP_GRACE) {
            tracing::warn!("clone `{clone}`: kiln run did not stop in {STOP_GRACE:?}: killing it");
            signal(child.pid, libc::SIGKILL);
            child.wait(Duration::from_secs(5));
        }
        Ok(())
    }

    /// Forgets a clone that is gone (deleted).
    pub fn forget(&self, clone: &str) {
        self.children().remove(clone);
    }

    /// Stops every run this server started (the server is ending).
    pub fn stop_all(&self) {
        let children: Vec<Arc<Child>> = self.children().values().cloned().collect();
        for c in &children {
            if c.exit().is_none() {
                signal(c.pid, libc::SIGINT);
            }
        }
        for c in &children {
            c.wait(STOP_GRACE);
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid this server spawned and has not reaped (its thread reaps it
    // only after `exit` is set, which callers checked); no memory is shared.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The last [`LOG_TAIL`] bytes of a log, from a line start.
fn tail(path: &Path) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(LOG_TAIL);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    match (from > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(d: &Path) -> CloneRuns {
        CloneRuns::new(RunConfig {
            program: PathBuf::from("/bin/false"),
            clones: d.join("clones"),
            run_root: d.join("run"),
        })
    }

    #[test]
    fn a_stale_socket_without_a_live_lock_holder_is_not_running() {
        let d = tempfile::tempdir().unwrap();
        let r = runs(d.path());
        let vm = d.path().join("run/clones/web-1/web");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(crate::engine::vsock_uds(&vm), "").unwrap();
        std::fs::create_dir_all(d.path().join("clones/web-1")).unwrap();
        let vms = vec!["web".to_string()];
        // No lock file: a socket left by a killed run.
        assert!(r.running_vms("web-1", &vms).is_empty());
        let lock = d
            .path()
            .join("clones/web-1")
            .join(crate::run_lock::LOCK_FILE);
        std::fs::write(&lock, std::process::id().to_string()).unwrap();
        assert_eq!(r.running_vms("web-1", &vms), vms);
        assert_eq!(r.state("web-1", &vms).state, "running");
        // Running, but not this server's: stop is refused, naming where to stop it.
        assert!(matches!(r.stop("web-1", &vms), Err(RunError::NotOurs(_))));
        assert!(matches!(r.start("web-1", &vms), Err(RunError::Running(_))));
        std::fs::write(&lock, "999999999").unwrap();
        assert_eq!(r.state("web-1", &vms).state, "stopped");
        assert!(matches!(
            r.stop("web-1", &vms),
            Err(RunError::NotRunning(_))
        ));
    }

    #[test]
    fn a_run_that_ends_is_stopped_with_its_exit_and_log() {
        let d = tempfile::tempdir().unwrap();
        let r = runs(d.path());
        r.start("web-1", &[]).unwrap();
        let c = r.child("web-1").unwrap();
        assert!(c.wait(Duration::from_secs(10)));
        let s = r.state("web-1", &[]);
        assert_eq!(s.state, "stopped");
        assert!(s.exit.is_some_and(|e| e.contains('1')));
        assert_eq!(s.log.as_deref(), Some(""));
    }

    #[test]
    fn the_tail_starts_at_a_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let long = "x".repeat(LOG_TAIL as usize);
        std::fs::write(&p, format!("{long}\nlast line\n")).unwrap();
        assert_eq!(tail(&p), "last line\n");
        std::fs::write(&p, "short\n").unwrap();
        assert_eq!(tail(&p), "short\n");
    }
}
