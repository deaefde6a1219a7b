//! One build started from the page while and after it runs: its [`BuildState`], its bounded
//! log, the streams waiting for either, and the signals that cancel it or resume a handbuild
//! step.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::state::{BuildState, PhaseMark, Status};
use super::BuildActionError;
use crate::job::BuildJob;

/// Log entries kept per build; older ones are dropped (the state keeps every phase).
const MAX_LOG_ENTRIES: usize = 20_000;
/// Bytes of log kept per build.
const MAX_LOG_BYTES: usize = 16 << 20;
/// Bytes of log a finished build keeps (its full logs stay in its log files), so that the
/// builds remembered for the page stay small.
const FINISHED_LOG_BYTES: usize = 2 << 20;
/// What `kiln build` prints on stderr when it keeps a failed build's logs: the folder
/// follows, then ` (`. The child picks that folder's name (its build id) itself.
const KEPT_LOGS: &str = "the build's logs are kept in ";
/// Lines of the child's stderr kept for the failure message.
const STDERR_TAIL: usize = 20;
/// How long a cancelled build may take to clean up before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(60);

pub(super) struct Inner {
    state: BuildState,
    /// Bumped on every state change, so streams know to send it.
    version: u64,
    /// Log entries (JSON text, each with its `id`), oldest first; `log_base` is the first's id.
    log: VecDeque<String>,
    log_base: u64,
    log_bytes: usize,
    stderr_tail: VecDeque<String>,
    pub(super) pid: Option<u32>,
    /// The child's pid, kept after it is reaped: it names the build's temporary files.
    pub(super) child_pid: Option<u32>,
    /// Where a failed build's logs went, as the child said.
    failed_logs: Option<PathBuf>,
    cancel_requested: bool,
    done: bool,
}

/// One build started from the page.
pub struct BuildRun {
    pub id: u64,
    job: BuildJob,
    started: Instant,
    run_root: PathBuf,
    inner: Mutex<Inner>,
    pub(super) changed: Condvar,
}

/// What a stream sends next.
pub struct Update {
    pub state: Option<String>,
    pub version: u64,
    /// `(id, json)` entries.
    pub log: Vec<(u64, String)>,
    pub next: u64,
    pub done: bool,
}

impl BuildRun {
    /// A build of `job` about to start, as `name` on the page.
    pub(super) fn new(id: u64, name: &str, job: BuildJob, run_root: PathBuf) -> BuildRun {
        BuildRun {
            id,
            started: Instant::now(),
            run_root,
            inner: Mutex::new(Inner {
                state: BuildState::new(id, name, &job),
                version: 1,
                log: VecDeque::new(),
                log_base: 0,
                log_bytes: 0,
                stderr_tail: VecDeque::new(),
                pid: None,
                child_pid: None,
                failed_logs: None,
                cancel_requested: false,
                done: false,
            }),
            changed: Condvar::new(),
            job,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn at_ms(&self) -> u64 {
        crate::events::ms(self.started.elapsed())
    }

    pub fn snapshot(&self) -> BuildState {
        self.lock().state.clone()
    }

    pub fn is_done(&self) -> bool {
        self.lock().done
    }

    fn push_log(inner: &mut Inner, mut entry: Value) {
        let id = inner.log_base + inner.log.len() as u64;
        if let Some(o) = entry.as_object_mut() {
            o.insert("id".into(), json!(id));
        }
        let text = entry.to_string();
        inner.log_bytes += text.len();
        inner.log.push_back(text);
        Self::trim_log(inner, MAX_LOG_ENTRIES, MAX_LOG_BYTES);
    }

    /// Drops the oldest log entries until at most `entries` and `bytes` are left.
    fn trim_log(inner: &mut Inner, entries: usize, bytes: usize) {
        while inner.log.len() > entries || inner.log_bytes > bytes {
            match inner.log.pop_front() {
                Some(old) => {
                    inner.log_bytes -= old.len();
                    inner.log_base += 1;
                    inner.state.log_dropped += 1;
                }
                None => break,
            }
        }
    }

    /// One line of the child's stdout: an event.
    pub(super) fn on_event_line(&self, line: &str) {
        let at = self.at_ms();
        let mut inner = self.lock();
        let ev: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            // Not an event (a stray print): keep it as output of kiln itself.
            _ => json!({ "event": "stdout", "line": line }),
        };
        if inner.state.apply(&ev, &self.job, at) {
            inner.version += 1;
        }
        // Progress only updates the state; everything else is also a log entry.
        if ev.get("event").and_then(Value::as_str) != Some("progress") {
            Self::push_log(&mut inner, ev);
        }
        drop(inner);
        self.changed.notify_all();
    }

    pub(super) fn on_stderr_line(&self, line: &str) {
        let mut inner = self.lock();
        if let Some((dir, _)) = line
            .strip_prefix(KEPT_LOGS)
            .and_then(|rest| rest.rsplit_once(" (`"))
        {
            inner.failed_logs = Some(PathBuf::from(dir));
        }
        inner.stderr_tail.push_back(line.to_string());
        if inner.stderr_tail.len() > STDERR_TAIL {
            inner.stderr_tail.pop_front();
        }
        Self::push_log(&mut inner, json!({ "event": "stderr", "line": line }));
        drop(inner);
        self.changed.notify_all();
    }

    /// Records the end. `exit` is the child's status, reaped by the caller under the lock
    /// (so `pid` never names a reused process).
    pub(super) fn finish(
        &self,
        inner: &mut Inner,
        exit: std::io::Result<std::process::ExitStatus>,
        output: &Path,
    ) {
        let duration = self.at_ms();
        let tail = inner
            .stderr_tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        let cancelled = inner.cancel_requested;
        let st = &mut inner.state;
        st.duration_ms = Some(duration);
        for vm in &mut st.vms {
            vm.paused = None;
        }
        match exit {
            Ok(code) if code.success() => {
                let dir = output.join(&st.module);
                match crate::module::load(&dir) {
                    Ok(record) => {
                        st.status = Status::Succeeded;
                        st.result = Some(json!({
                            "dir": dir.display().to_string(),
                            "record": record,
                        }));
                    }
                    Err(e) => {
                        st.status = Status::Failed;
                        st.error = Some(format!("kiln build exited 0 but {e}"));
                    }
                }
            }
            Ok(code) => {
                st.status = if cancelled {
                    Status::Cancelled
                } else {
                    Status::Failed
                };
                st.error = Some(if tail.is_empty() {
                    format!("kiln build ended with {code}")
                } else {
                    tail
                });
            }
            Err(e) => {
                st.status = Status::Failed;
                st.error = Some(format!("cannot wait for kiln build: {e}"));
            }
        }
        if st.status != Status::Succeeded && st.phase != "Failed" {
            st.phase = "Failed".into();
            st.phases.push(PhaseMark {
                phase: "Failed".into(),
                at_ms: duration,
                message: st.error.clone(),
            });
        }
        Self::trim_log(inner, MAX_LOG_ENTRIES, FINISHED_LOG_BYTES);
        inner.version += 1;
        inner.done = true;
        inner.pid = None;
    }

    /// The folder that holds this build's log files now, in the modules folder `output`:
    /// the module being written while it runs, the module once built, `<output>/.logs/<id>`
    /// once failed. Also the event log's file, which is filed into that folder at the end.
    pub fn log_folder(&self, output: &Path) -> Option<super::logs::LogFolder> {
        let inner = self.lock();
        let module = &inner.state.module;
        if !inner.done {
            let pid = inner.child_pid?;
            return Some(super::logs::LogFolder {
                dir: output.join(format!(".{module}.partial-{pid}")).join("logs"),
                events: Some(output.join(format!(".{module}.events-{pid}.jsonl"))),
            });
        }
        let dir = match inner.state.status {
            Status::Succeeded => output.join(module).join("logs"),
            // Only a folder where `kiln build` keeps failed logs: the path came from the
            // child's stderr.
            _ => inner
                .failed_logs
                .clone()
                .filter(|d| d.parent() == Some(&output.join(crate::build_logs::FAILED_DIR)))?,
        };
        Some(super::logs::LogFolder { dir, events: None })
    }

    /// Waits until there is something after `next`/`version` to send, or `timeout` passes.
    pub fn wait_update(&self, next: u64, version: u64, timeout: Duration) -> Update {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            let end = inner.log_base + inner.log.len() as u64;
            if end > next || inner.version != version || inner.done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let start = next.max(inner.log_base);
        let skip = (start - inner.log_base) as usize;
        let log: Vec<(u64, String)> = inner
            .log
            .iter()
            .skip(skip)
            .enumerate()
            .map(|(i, t)| (start + i as u64, t.clone()))
            .collect();
        let next = start + log.len() as u64;
        let state = (inner.version != version)
            .then(|| serde_json::to_string(&inner.state).unwrap_or_default());
        Update {
            state,
            version: inner.version,
            log,
            next,
            done: inner.done,
        }
    }

    /// Asks the build to stop: SIGINT, as Ctrl-C in a terminal; SIGKILL if it has not ended
    /// after [`CANCEL_GRACE`].
    pub fn cancel(self: &Arc<Self>) -> Result<(), BuildActionError> {
        let mut inner = self.lock();
        let Some(pid) = inner.pid.filter(|_| !inner.done) else {
            return Err(BuildActionError::NotRunning(self.id));
        };
        inner.cancel_requested = true;
        // Under the lock: the waiter reaps the child under it too, so `pid` is still ours.
        signal(pid, libc::SIGINT);
        drop(inner);
        let me = self.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + CANCEL_GRACE;
            while Instant::now() < deadline {
                if me.is_done() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let inner = me.lock();
            if let Some(pid) = inner.pid {
                tracing::warn!("build {} did not stop after SIGINT; killing it", me.id);
                signal(pid, libc::SIGKILL);
            }
        });
        Ok(())
    }

    /// Ends a handbuild pause of `vm`: writes the resume flag `kiln resume <vm>` writes.
    pub fn resume(&self, vm: &str) -> Result<(), BuildActionError> {
        let inner = self.lock();
        let pid = match inner.pid {
            Some(p) if !inner.done => p,
            _ => return Err(BuildActionError::NotRunning(self.id)),
        };
        let paused = inner
            .state
            .vms
            .iter()
            .any(|v| v.name == vm && v.paused.is_some());
        drop(inner);
        if !paused {
            return Err(BuildActionError::NotPaused(vm.into()));
        }
        let dir = self.run_root.join(pid.to_string()).join(vm);
        std::fs::write(dir.join("resume"), b"").map_err(|source| BuildActionError::Resume {
            vm: vm.into(),
            source,
        })
    }
}

impl BuildRun {
    /// The consoles this build's VMs have now and that answer (none once it ended);
    /// `invisible` VMs never.
    pub fn consoles(&self) -> Vec<crate::console::Console> {
        let rec = crate::console::BuildRecord::of(&self.job);
        let Some(pid) = self.running_pid() else {
            return Vec::new();
        };
        rec.vms
            .iter()
            .filter(|v| !v.invisible)
            .filter_map(|v| crate::console::console_of(&self.run_root, pid, &rec, &v.name).ok())
            // Only a server that answers: between a guest's reboot and its fresh QEMU the
            // socket is there but nobody listens, and the page would fail to connect.
            .filter(|c| std::os::unix::net::UnixStream::connect(&c.socket).is_ok())
            .collect()
    }

    /// VM `vm`'s console, while the build runs.
    pub fn console(&self, vm: &str) -> Result<crate::console::Console, BuildActionError> {
        let pid = self
            .running_pid()
            .ok_or(BuildActionError::NotRunning(self.id))?;
        let rec = crate::console::BuildRecord::of(&self.job);
        if !rec.vms.iter().any(|v| v.name == vm) {
            let vms: Vec<&str> = rec.vms.iter().map(|v| v.name.as_str()).collect();
            return Err(crate::console::ConsoleError::NotInBuild {
                build: rec.module.clone(),
                vm: vm.into(),
                vms: vms.join(", "),
            }
            .into());
        }
        Ok(crate::console::console_of(&self.run_root, pid, &rec, vm)?)
    }

    fn running_pid(&self) -> Option<u32> {
        let inner = self.lock();
        inner.pid.filter(|_| !inner.done)
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory. Callers hold the build's
    // lock, under which the waiter reaps the child and clears `pid`, so the pid is our own
    // unreaped child's and cannot name a reused process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        tracing::debug!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
}
