//! Builds started from the page. Each build runs as a `kiln build --json` child process, not
//! on a thread of the server:
//! - the pipeline keys its runtime folder (sockets, the handbuild resume flag) by process id
//!   and installs a process-wide Ctrl-C handler, so two builds in one process would collide;
//! - cancelling is the same SIGINT a user sends `kiln build` in a terminal, with the same
//!   cleanup (VMs stopped, no half module), and a crashing build cannot take the editor down;
//! - the child's `--json` events are exactly what `kiln build --json` prints, so the page
//!   shows the same stream scripts see.
//!
//! The server reads the child's events, keeps a small [`BuildState`] (phases, steps, a
//! handbuild pause) and a bounded log, and wakes the Server-Sent Events streams of the page.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};

use crate::job::{BuildJob, StepKind};
use crate::plan_adapter::{load_job, LoadJobError};

/// Log entries kept per build; older ones are dropped (the state keeps every phase).
const MAX_LOG_ENTRIES: usize = 20_000;
/// Bytes of log kept per build.
const MAX_LOG_BYTES: usize = 16 << 20;
/// Longest event line read from the child; longer ones are cut.
const MAX_LINE: usize = 256 << 10;
/// Lines of the child's stderr kept for the failure message.
const STDERR_TAIL: usize = 20;
/// Finished builds remembered for the page.
const KEEP_FINISHED: usize = 8;
/// How long a cancelled build may take to clean up before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(60);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A phase reached, with when (milliseconds since the build started).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseMark {
    pub phase: String,
    pub at_ms: u64,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    pub name: String,
    pub kind: String,
    /// `pending`, `running`, `ok` or `failed`.
    pub status: &'static str,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    pub index: usize,
    pub step: String,
    pub instructions: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmState {
    pub name: String,
    pub phase: String,
    pub message: Option<String>,
    pub phases: Vec<PhaseMark>,
    pub steps: Vec<StepState>,
    /// Set while a handbuild step waits for Continue.
    pub paused: Option<Pause>,
    /// The last transfer's progress: `{what, done, total}`.
    pub progress: Option<Value>,
}

/// What the page shows of a build; sent whole on every change (it is small: the log is not in
/// it).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildState {
    pub id: u64,
    pub manifest: String,
    pub module: String,
    pub status: Status,
    pub phase: String,
    pub phases: Vec<PhaseMark>,
    pub vms: Vec<VmState>,
    /// Unix milliseconds.
    pub started_at: u64,
    pub duration_ms: Option<u64>,
    /// Why it failed: the last lines kiln printed.
    pub error: Option<String>,
    /// The module made: `{dir, record}` (the record is its `module.yaml`).
    pub result: Option<Value>,
    /// Log entries dropped to bound memory.
    pub log_dropped: u64,
}

impl BuildState {
    /// The state before any event: every VM pending, every step listed.
    pub fn new(id: u64, manifest: &str, job: &BuildJob) -> BuildState {
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(crate::events::ms)
            .unwrap_or(0);
        BuildState {
            id,
            manifest: manifest.into(),
            module: job.name.clone(),
            status: Status::Running,
            phase: "Pending".into(),
            phases: vec![],
            vms: job
                .vms
                .iter()
                .map(|vm| VmState {
                    name: vm.name.clone(),
                    phase: "Pending".into(),
                    message: None,
                    phases: vec![],
                    steps: vm
                        .steps
                        .iter()
                        .map(|s| StepState {
                            name: s.name.clone(),
                            kind: s.kind.label().into(),
                            status: "pending",
                            duration_ms: None,
                            message: None,
                        })
                        .collect(),
                    paused: None,
                    progress: None,
                })
                .collect(),
            started_at,
            duration_ms: None,
            error: None,
            result: None,
            log_dropped: 0,
        }
    }

    fn vm(&mut self, name: &str) -> Option<&mut VmState> {
        self.vms.iter_mut().find(|v| v.name == name)
    }

    /// Applies one event of `kiln build --json`. `job` gives handbuild instructions.
    /// Returns whether the state changed. Unknown or malformed events change nothing.
    pub fn apply(&mut self, ev: &Value, job: &BuildJob, at_ms: u64) -> bool {
        let s = |k: &str| ev.get(k).and_then(Value::as_str);
        let msg = s("message").map(str::to_string);
        let vm_name = s("vm").unwrap_or("").to_string();
        match s("event") {
            Some("build") => {
                let Some(phase) = s("phase") else {
                    return false;
                };
                self.phase = phase.into();
                self.phases.push(PhaseMark {
                    phase: phase.into(),
                    at_ms,
                    message: msg,
                });
                true
            }
            Some("vm") => {
                let Some(phase) = s("phase") else {
                    return false;
                };
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                vm.phase = phase.into();
                vm.message = msg.clone();
                vm.progress = None;
                if matches!(phase, "Failed" | "Succeeded") {
                    vm.paused = None;
                }
                vm.phases.push(PhaseMark {
                    phase: phase.into(),
                    at_ms,
                    message: msg,
                });
                true
            }
            Some("stepStarted") => {
                let Some(i) = ev.get("index").and_then(Value::as_u64) else {
                    return false;
                };
                let i = i as usize;
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                match vm.steps.get_mut(i) {
                    Some(st) => st.status = "running",
                    None => return false,
                }
                vm.paused = None;
                true
            }
            Some("stepFinished") => {
                let Some(i) = ev.get("index").and_then(Value::as_u64) else {
                    return false;
                };
                let ok = ev.get("ok").and_then(Value::as_bool).unwrap_or(false);
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                match vm.steps.get_mut(i as usize) {
                    Some(st) => {
                        st.status = if ok { "ok" } else { "failed" };
                        st.duration_ms = ev.get("durationMs").and_then(Value::as_u64);
                        st.message = msg;
                    }
                    None => return false,
                }
                vm.paused = None;
                true
            }
            // A handbuild step announces its pause with a note, after it has cleared any old
            // resume flag: only then may Continue write a new one.
            Some("note") => {
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                let Some(index) = vm.steps.iter().position(|st| st.status == "running") else {
                    return false;
                };
                let Some(step) = job
                    .vms
                    .iter()
                    .find(|v| v.name == vm_name)
                    .and_then(|v| v.steps.get(index))
                else {
                    return false;
                };
                match &step.kind {
                    StepKind::Handbuild { instructions } if vm.paused.is_none() => {
                        vm.paused = Some(Pause {
                            index,
                            step: step.name.clone(),
                            instructions: instructions.trim().to_string(),
                        });
                        true
                    }
                    _ => false,
                }
            }
            Some("progress") => {
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                vm.progress = Some(json!({
                    "what": ev.get("what"),
                    "done": ev.get("done"),
                    "total": ev.get("total"),
                }));
                true
            }
            _ => false,
        }
    }
}

struct Inner {
    state: BuildState,
    /// Bumped on every state change, so streams know to send it.
    version: u64,
    /// Log entries (JSON text, each with its `id`), oldest first; `log_base` is the first's id.
    log: VecDeque<String>,
    log_base: u64,
    log_bytes: usize,
    stderr_tail: VecDeque<String>,
    pid: Option<u32>,
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
    changed: Condvar,
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
    fn lock(&self) -> MutexGuard<'_, Inner> {
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
        while inner.log.len() > MAX_LOG_ENTRIES || inner.log_bytes > MAX_LOG_BYTES {
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
    fn on_event_line(&self, line: &str) {
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

    fn on_stderr_line(&self, line: &str) {
        let mut inner = self.lock();
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
    fn finish(
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
        inner.version += 1;
        inner.done = true;
        inner.pid = None;
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
        let run = Arc::new(BuildRun {
            id,
            started: Instant::now(),
            run_root: self.cfg.run_root.clone(),
            inner: Mutex::new(Inner {
                state: BuildState::new(id, name, &job),
                version: 1,
                log: VecDeque::new(),
                log_base: 0,
                log_bytes: 0,
                stderr_tail: VecDeque::new(),
                pid: None,
                cancel_requested: false,
                done: false,
            }),
            changed: Condvar::new(),
            job,
        });
        spawn(&self.cfg, run.clone(), path)?;
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

/// Runs the child on a thread of its own that lives exactly as long as the child: the child
/// gets SIGINT when that thread ends (PR_SET_PDEATHSIG follows the spawning thread), which
/// happens only if the server dies first, so a build never outlives its editor.
fn spawn(cfg: &BuildConfig, run: Arc<BuildRun>, path: &Path) -> Result<(), BuildStartError> {
    let mut cmd = Command::new(&cfg.program);
    // `--force`: the editor's Build button is its edit-build loop, a rebuild is what was
    // asked for, and clones of the module it replaces keep their own links to the old disks.
    cmd.arg("build")
        .arg("--json")
        .arg("--output")
        .arg(&cfg.output)
        .arg(path)
        .arg("--force")
        .env("KILN_RUN_DIR", &cfg.run_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt as _;
        // Its own process group: a Ctrl-C meant for the editor reaches the build only
        // through the parent-death signal, once.
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), std::io::Error>>();
    let output = cfg.output.clone();
    let program = cfg.program.clone();
    std::thread::Builder::new()
        .name(format!("build-{}", run.id))
        .spawn(move || {
            let mut child: Child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            run.lock().pid = Some(child.id());
            let _ = tx.send(Ok(()));
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let mut readers = 0;
            for (i, r) in [
                child
                    .stdout
                    .take()
                    .map(|o| Box::new(o) as Box<dyn Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|e| Box::new(e) as Box<dyn Read + Send>),
            ]
            .into_iter()
            .enumerate()
            {
                let Some(r) = r else { continue };
                let (run, done_tx) = (run.clone(), done_tx.clone());
                readers += 1;
                std::thread::spawn(move || {
                    read_lines(r, |line| {
                        if i == 0 {
                            run.on_event_line(line)
                        } else {
                            run.on_stderr_line(line)
                        }
                    });
                    let _ = done_tx.send(());
                });
            }
            drop(done_tx);
            // Wait for the child, reaping it under the lock that `cancel` signals under.
            let exit = loop {
                {
                    let mut inner = run.lock();
                    match child.try_wait() {
                        Ok(Some(st)) => {
                            inner.pid = None;
                            break Ok(st);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            inner.pid = None;
                            break Err(e);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            // Read what the child printed last. A VM process it left behind could hold the
            // pipes open: do not wait for that forever.
            let until = Instant::now() + Duration::from_secs(5);
            for _ in 0..readers {
                let left = until.saturating_duration_since(Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            let mut inner = run.lock();
            run.finish(&mut inner, exit, &output);
            drop(inner);
            run.changed.notify_all();
        })
        .map_err(|source| BuildStartError::Spawn {
            program: program.clone(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(BuildStartError::Spawn { program, source }),
        Err(_) => Err(BuildStartError::Spawn {
            program,
            source: std::io::Error::other("the build thread ended early"),
        }),
    }
}

/// Calls `f` with each line, cut to [`MAX_LINE`] bytes, invalid UTF-8 replaced.
fn read_lines(r: Box<dyn Read + Send>, mut f: impl FnMut(&str)) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) => {
                let cut = buf.last() != Some(&b'\n');
                let text = String::from_utf8_lossy(&buf);
                f(text.trim_end_matches(['\n', '\r']));
                if cut {
                    // Skip the rest of an overlong line.
                    let mut rest = Vec::new();
                    loop {
                        rest.clear();
                        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut rest) {
                            Ok(0) => return,
                            Ok(_) if rest.last() == Some(&b'\n') => break,
                            Ok(_) => continue,
                            Err(_) => return,
                        }
                    }
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Step, VmJob};
    use std::collections::BTreeMap;

    fn job() -> BuildJob {
        let step = |name: &str, kind| Step {
            name: name.into(),
            timeout: None,
            kind,
        };
        BuildJob {
            name: "m".into(),
            manifest_path: PathBuf::from("m.yaml"),
            manifest_text: String::new(),
            http_directory: vec![],
            vms: vec![VmJob {
                name: "a".into(),
                source: crate::job::SourceSpec::Blank,
                cpus: 1,
                memory_mib: 512,
                disks: vec![],
                cloud_init: None,
                steps: vec![
                    step(
                        "wait",
                        StepKind::Handbuild {
                            instructions: " install the thing \n".into(),
                        },
                    ),
                    step("s", StepKind::Reboot { command: None }),
                ],
                clean_for_template: true,
                internet: false,
                nics: vec![],
                boot_timeout: Duration::from_secs(300),
            }],
            files: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            retries: 0,
            network: Default::default(),
            base: Default::default(),
        }
    }

    #[test]
    fn events_drive_phases_steps_and_the_handbuild_pause() {
        let j = job();
        let mut s = BuildState::new(1, "m.yaml", &j);
        assert_eq!(s.vms[0].steps.len(), 2);
        assert!(s.apply(&json!({"event":"build","phase":"Building"}), &j, 5));
        assert!(s.apply(
            &json!({"event":"vm","vm":"a","phase":"Provisioning"}),
            &j,
            6
        ));
        assert!(s.apply(
            &json!({"event":"stepStarted","vm":"a","index":0,"step":"wait","kind":"handbuild"}),
            &j,
            7
        ));
        assert!(
            s.vms[0].paused.is_none(),
            "paused only once the note says so"
        );
        assert!(s.apply(
            &json!({"event":"note","vm":"a","message":"handbuild..."}),
            &j,
            8
        ));
        let p = s.vms[0].paused.clone().expect("paused");
        assert_eq!((p.index, p.instructions.as_str()), (0, "install the thing"));
        assert!(s.apply(
            &json!({"event":"stepFinished","vm":"a","index":0,"step":"wait","ok":true,"durationMs":9}),
            &j,
            9
        ));
        assert!(s.vms[0].paused.is_none());
        assert_eq!(s.vms[0].steps[0].status, "ok");
        // Notes during a non-handbuild step do not pause.
        s.apply(&json!({"event":"stepStarted","vm":"a","index":1}), &j, 10);
        assert!(!s.apply(&json!({"event":"note","vm":"a","message":"x"}), &j, 11));
        assert!(s.vms[0].paused.is_none());
        assert_eq!(s.vms[0].phases[0].phase, "Provisioning");
        assert_eq!(s.phase, "Building");
    }

    #[test]
    fn malformed_events_change_nothing() {
        let j = job();
        let mut s = BuildState::new(1, "m.yaml", &j);
        for ev in [
            json!({}),
            json!({"event":"vm","vm":"nope","phase":"Booting"}),
            json!({"event":"stepStarted","vm":"a","index":99}),
            json!({"event":"stepFinished","vm":"a","index":"x"}),
            json!({"event":"build"}),
            json!({"event":"note","vm":"a"}),
            json!([1, 2]),
        ] {
            assert!(!s.apply(&ev, &j, 0), "{ev}");
        }
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_skipped() {
        let mut data = vec![b'x'; MAX_LINE + 10];
        data.extend_from_slice(b"\nnext\n");
        let mut lines = Vec::new();
        read_lines(Box::new(std::io::Cursor::new(data)), |l| {
            lines.push(l.len())
        });
        assert_eq!(lines, vec![MAX_LINE, 4]);
    }
}
