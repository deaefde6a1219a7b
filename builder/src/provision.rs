//! Runs a VM's provisioning steps, in order, through the guest agent: `shell`, `file`,
//! `reboot`, `handbuild`. Output is streamed to the events (terminal, `--json`) and the VM's
//! log; the first failing step stops the VM with its name, exit status and last output lines.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::{ms, Event, EventSink, Stream};
use crate::guest::{Connector, ExecOutcome, Guest, GuestCommand, GuestError, WaitError};
use crate::job::{FileContent, Step, StepKind};
use crate::sources::url::FileFetchError;

/// How many output lines a failure message carries.
pub const TAIL_LINES: usize = 20;
/// How long a VM may take to (re)boot until its agent answers.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest may take to go down after a reboot request.
pub const DOWN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("step {index} '{name}' failed: {status}{}", tail_block(.tail))]
    Failed {
        index: usize,
        name: String,
        status: String,
        tail: Vec<String>,
    },
    #[error("step {index} '{name}' ({kind}): {source}")]
    Guest {
        index: usize,
        name: String,
        kind: &'static str,
        #[source]
        source: GuestError,
    },
    #[error("step {index} '{name}': file `{file}` is not in the manifest's files")]
    NoFile {
        index: usize,
        name: String,
        file: String,
    },
    #[error("step {index} '{name}': fetching file `{file}`: {source}")]
    FileFetch {
        index: usize,
        name: String,
        file: String,
        #[source]
        source: FileFetchError,
    },
    #[error(
        "step {index} '{name}': the handbuild pause timed out: nobody resumed it within its \
         stepTimeout of {}, so the manual work is not known to be done",
        crate::manifest::units::format_duration(*.timeout)
    )]
    PauseTimedOut {
        index: usize,
        name: String,
        timeout: Duration,
    },
    #[error("step {index} '{name}': checkpoint for the step cache: {message}")]
    Checkpoint {
        index: usize,
        name: String,
        message: String,
    },
    #[error("cancelled")]
    Cancelled,
}

fn tail_block(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output:\n  {}", tail.join("\n  "))
    }
}

/// Inputs of a provisioning run.
pub struct Provisioner<'a> {
    pub vm: &'a str,
    pub steps: &'a [Step],
    pub files: &'a BTreeMap<String, FileContent>,
    pub connector: &'a dyn Connector,
    pub events: &'a dyn EventSink,
    /// The VM's log file (guest output and step records).
    pub log: Option<&'a std::sync::Mutex<std::fs::File>>,
    pub cancel: Arc<AtomicBool>,
    /// Where a `handbuild` step waits for `kiln resume`: this file appearing resumes it.
    pub resume_flag: PathBuf,
    /// Fetches a `files[]` URL (the build's cache).
    pub fetch_url: &'a (dyn Fn(&str) -> Result<Vec<u8>, FileFetchError> + Sync),
    /// Gets the guest's network ready after a reboot, as after the first boot.
    pub network_ready: &'a dyn Fn(&mut dyn Guest),
    /// The step cache: the first step to run (the ones before it came from the cache), and
    /// what runs after each step that succeeded (a checkpoint), given the step's index and
    /// how long it ran.
    pub start: usize,
    pub after_step: &'a AfterStep<'a>,
    /// What to do after a step fails (`--on-error ask`), asked with the VM still up; `None`
    /// fails the run.
    pub on_failure: Option<&'a dyn Fn(&StepFailure) -> AfterFailure>,
}

/// A failed step, as [`Provisioner::on_failure`] is told of it.
pub struct StepFailure<'a> {
    pub vm: &'a str,
    /// From 1, as messages count steps.
    pub number: usize,
    pub step: &'a Step,
    pub error: &'a StepError,
}

/// What a provisioning run does after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Run the step again, on the same guest.
    Retry,
    /// Go on with the next step, as if this one had succeeded.
    Skip,
    /// Fail the run with the step's error.
    Fail,
}

/// What runs after each step that succeeded: given its index, the session and how long the
/// step ran; an error fails the step.
pub type AfterStep<'a> = dyn Fn(usize, &mut dyn Guest, Duration) -> Result<(), String> + 'a;

impl Provisioner<'_> {
    fn log_line(&self, line: &str) {
        if let Some(l) = self.log {
            let mut f = l.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
    }

    /// Runs every step on an already connected guest. Returns the session for the steps
    /// that follow (capture), which may be a new one after a reboot.
    pub fn run(&self, mut guest: Box<dyn Guest>) -> Result<Box<dyn Guest>, StepError> {
        // Once a failure was answered (retried or skipped), the guest holds what the steps'
        // keys do not say (what the failed run or a shell left): no more layers are taken.
        let mut off_script = false;
        for (index, step) in self.steps.iter().enumerate().skip(self.start) {
            let start = Instant::now();
            guest = loop {
                let error = match self.attempt(index, step, guest) {
                    Ok(g) => break g,
                    Err(e) => e,
                };
                let after = self.after_failure(index, step, &error);
                off_script |= after != AfterFailure::Fail;
                match after {
                    AfterFailure::Fail => return Err(error),
                    AfterFailure::Retry => guest = self.reconnect(index, step)?,
                    AfterFailure::Skip => break self.reconnect(index, step)?,
                }
            };
            if off_script {
                continue;
            }
            (self.after_step)(index, &mut *guest, start.elapsed()).map_err(|message| {
                StepError::Checkpoint {
                    index: index + 1,
                    name: step.name.clone(),
                    message,
                }
            })?;
        }
        Ok(guest)
    }

    fn after_failure(&self, index: usize, step: &Step, error: &StepError) -> AfterFailure {
        match self.on_failure {
            Some(ask) if !matches!(error, StepError::Cancelled) => ask(&StepFailure {
                vm: self.vm,
                number: index + 1,
                step,
                error,
            }),
            _ => AfterFailure::Fail,
        }
    }

    /// A new session after a failed step (the failed one took its session with it).
    fn reconnect(&self, index: usize, step: &Step) -> Result<Box<dyn Guest>, StepError> {
        self.connector
            .connect_until(BOOT_TIMEOUT, &self.cancel, &mut |_| Ok(()))
            .map_err(|e| match e {
                WaitError::Cancelled => StepError::Cancelled,
                e => StepError::Guest {
                    index: index + 1,
                    name: step.name.clone(),
                    kind: step.kind.label(),
                    source: GuestError::from(e),
                },
            })
    }

    /// One run of one step, told as started and finished.
    fn attempt(
        &self,
        index: usize,
        step: &Step,
        guest: Box<dyn Guest>,
    ) -> Result<Box<dyn Guest>, StepError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(StepError::Cancelled);
        }
        let kind = step.kind.label();
        self.events.emit(&Event::StepStarted {
            vm: self.vm.into(),
            index,
            step: step.name.clone(),
            kind: kind.into(),
        });
        self.log_line(&format!("==> step {} '{}' ({kind})", index + 1, step.name));
        let start = Instant::now();
        let result = self.step(index, step, guest);
        let (ok, message) = match &result {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        self.events.emit(&Event::StepFinished {
            vm: self.vm.into(),
            index,
            step: step.name.clone(),
            ok,
            duration_ms: ms(start.elapsed()),
            message: message.clone(),
        });
        self.log_line(&format!(
            "<== step '{}' {} in {:.1}s{}",
            step.name,
            if ok { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64(),
            message.map(|m| format!(": {m}")).unwrap_or_default()
        ));
        result
    }

    fn step(
        &self,
        index: usize,
        step: &Step,
        mut guest: Box<dyn Guest>,
    ) -> Result<Box<dyn Guest>, StepError> {
        let gerr = |source| StepError::Guest {
            index: index + 1,
            name: step.name.clone(),
            kind: step.kind.label(),
            source,
        };
        match &step.kind {
            StepKind::Shell {
                inline,
                env,
                execute_command,
            } => {
                let cmd = shell_command(index, inline, execute_command.as_deref(), &mut *guest)
                    .map_err(gerr)?;
                let (outcome, tail) = self.exec_streamed(&mut *guest, &cmd, env, step)?;
                if !outcome.success() {
                    return Err(StepError::Failed {
                        index: index + 1,
                        name: step.name.clone(),
                        status: outcome.to_string(),
                        tail,
                    });
                }
                Ok(guest)
            }
            StepKind::File { file, destination } => {
                let data = match self.files.get(file) {
                    None => {
                        return Err(StepError::NoFile {
                            index: index + 1,
                            name: step.name.clone(),
                            file: file.clone(),
                        })
                    }
                    Some(FileContent::Inline(s)) => s.clone().into_bytes(),
                    Some(FileContent::Url(u)) => {
                        (self.fetch_url)(u).map_err(|source| StepError::FileFetch {
                            index: index + 1,
                            name: step.name.clone(),
                            file: file.clone(),
                            source,
                        })?
                    }
                    Some(FileContent::Cached { url, path }) => {
                        std::fs::read(path).map_err(|source| StepError::FileFetch {
                            index: index + 1,
                            name: step.name.clone(),
                            file: file.clone(),
                            source: FileFetchError::Prefetched {
                                url: url.clone(),
                                path: path.clone(),
                                source,
                            },
                        })?
                    }
                };
                guest.put_file(destination, &data, 0o644).map_err(gerr)?;
                Ok(guest)
            }
            StepKind::Reboot { command } => {
                self.reboot(guest, command.as_deref(), step).map_err(gerr)
            }
            StepKind::Handbuild { instructions } => match self.handbuild(instructions, step) {
                Pause::Resumed => Ok(guest),
                Pause::Cancelled => Err(StepError::Cancelled),
                Pause::TimedOut(timeout) => Err(StepError::PauseTimedOut {
                    index: index + 1,
                    name: step.name.clone(),
                    timeout,
                }),
            },
        }
    }

    /// Runs a command, streaming its lines; returns the outcome and the last lines.
    fn exec_streamed(
        &self,
        guest: &mut dyn Guest,
        cmd: &GuestCommand,
        env: &BTreeMap<String, String>,
        step: &Step,
    ) -> Result<(ExecOutcome, Vec<String>), StepError> {
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let emit_line = |stream: Stream, line: &[u8], tail: &mut VecDeque<String>| {
            let text = String::from_utf8_lossy(line)
                .trim_end_matches('\r')
                .to_string();
            self.log_line(&format!("{}| {text}", self.vm));
            self.events.emit(&Event::StepOutput {
                vm: self.vm.into(),
                step: step.name.clone(),
                stream,
                line: text.clone(),
            });
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        };
        let res = guest.exec(cmd, env, step.timeout, &mut |stream, data| {
            let i = usize::from(stream == Stream::Stderr);
            partial[i].extend_from_slice(data);
            while let Some(pos) = partial[i].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial[i].drain(..=pos).collect();
                emit_line(stream, &line[..line.len() - 1], &mut tail);
            }
            // Bound memory on output without newlines.
            if partial[i].len() > 64 << 10 {
                let line = std::mem::take(&mut partial[i]);
                emit_line(stream, &line, &mut tail);
            }
        });
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !partial[i].is_empty() {
                let line = std::mem::take(&mut partial[i]);
                emit_line(stream, &line, &mut tail);
            }
        }
        let outcome = res.map_err(|source| StepError::Guest {
            index: 0,
            name: step.name.clone(),
            kind: step.kind.label(),
            source,
        })?;
        Ok((outcome, tail.into_iter().collect()))
    }

    /// Reboot: record the boot id, ask for the reboot, then reconnect until an agent answers
    /// from a different boot.
    fn reboot(
        &self,
        mut guest: Box<dyn Guest>,
        command: Option<&str>,
        step: &Step,
    ) -> Result<Box<dyn Guest>, GuestError> {
        let before = boot_id(&mut *guest)?;
        match command {
            None => guest.reboot()?,
            Some(c) => {
                // The session may drop while the command runs: that is the reboot happening.
                let env = BTreeMap::new();
                let _ = guest.exec(
                    &GuestCommand::Bash(format!("({c}) &")),
                    &env,
                    Some(Duration::from_secs(30)),
                    &mut |_, _| {},
                );
            }
        }
        drop(guest);
        let limit = step.timeout.unwrap_or(BOOT_TIMEOUT + DOWN_TIMEOUT);
        // An agent that still answers from the old boot is the guest not yet gone down.
        let mut from_a_new_boot = |g: &mut dyn Guest| match boot_id(g)? {
            id if id != before => Ok(()),
            _ => Err(GuestError::NotAvailable(
                "the guest has not gone down yet".into(),
            )),
        };
        let mut guest = self
            .connector
            .connect_until(limit, &self.cancel, &mut from_a_new_boot)
            .map_err(|e| match e {
                WaitError::Cancelled | WaitError::Refused(_) => GuestError::from(e),
                WaitError::TimedOut { waited, last } => GuestError::NotReady {
                    waited,
                    last: format!("after the reboot: {last}"),
                },
            })?;
        (self.network_ready)(&mut *guest);
        Ok(guest)
    }

    fn handbuild(&self, instructions: &str, step: &Step) -> Pause {
        let _ = std::fs::remove_file(&self.resume_flag);
        self.events.emit(&Event::Note {
            vm: Some(self.vm.into()),
            message: format!(
                "handbuild '{}': {}\n  Do the work on the console (`kiln shell {}`), then run \
                 `kiln resume {}` or press Enter here.",
                step.name,
                instructions.trim(),
                self.vm,
                self.vm
            ),
        });
        let enter = Arc::new(AtomicBool::new(false));
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            let e = enter.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                if std::io::stdin().read_line(&mut s).is_ok() {
                    e.store(true, Ordering::SeqCst);
                }
            });
        }
        let start = Instant::now();
        while !self.resume_flag.exists() && !enter.load(Ordering::SeqCst) {
            if self.cancel.load(Ordering::SeqCst) {
                return Pause::Cancelled;
            }
            if let Some(t) = step.timeout.filter(|t| start.elapsed() > *t) {
                return Pause::TimedOut(t);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = std::fs::remove_file(&self.resume_flag);
        if self.cancel.load(Ordering::SeqCst) {
            return Pause::Cancelled;
        }
        Pause::Resumed
    }
}

/// How a `handbuild` pause ended.
enum Pause {
    Resumed,
    Cancelled,
    /// The step's timeout (held here) passed with no resume: the manual work may not have
    /// been done.
    TimedOut(Duration),
}

/// The guest's boot id (changes on every boot): as the agent reported it in its hello, or
/// read with a command from an agent that does not report it.
pub fn boot_id(guest: &mut dyn Guest) -> Result<String, GuestError> {
    if let Some(id) = guest.reported_boot_id() {
        return Ok(id);
    }
    let mut out = Vec::new();
    let st = guest.exec(
        &GuestCommand::Argv(vec!["cat".into(), "/proc/sys/kernel/random/boot_id".into()]),
        &BTreeMap::new(),
        Some(Duration::from_secs(30)),
        &mut |s, d| {
            if s == Stream::Stdout {
                out.extend_from_slice(d)
            }
        },
    )?;
    if !st.success() {
        return Err(GuestError::Agent(format!("reading the boot id: {st}")));
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

/// The command a shell step runs. Without `executeCommand` the script runs with bash. With
/// it, the script is uploaded to a file and `{{ .Command }}` is replaced by the command that
/// runs that file, so wrappers like `sudo -S sh -c '{{ .Command }}'` work unchanged.
pub fn shell_command(
    index: usize,
    inline: &str,
    execute_command: Option<&str>,
    guest: &mut dyn Guest,
) -> Result<GuestCommand, GuestError> {
    match execute_command {
        None => Ok(GuestCommand::Bash(inline.to_string())),
        Some(wrapper) => {
            let path = format!("/tmp/kiln-step-{}.sh", index + 1);
            guest.put_file(&path, inline.as_bytes(), 0o700)?;
            let run = format!("/bin/bash {path}");
            Ok(GuestCommand::Bash(substitute_command(wrapper, &run)))
        }
    }
}

/// Replaces `{{ .Command }}` (spacing inside the braces is free, as in Go templates).
pub fn substitute_command(wrapper: &str, command: &str) -> String {
    let mut out = String::new();
    let mut rest = wrapper;
    while let Some(start) = rest.find("{{") {
        let Some(end_rel) = rest[start..].find("}}") else {
            break;
        };
        let inner = rest[start + 2..start + end_rel].trim();
        out.push_str(&rest[..start]);
        if inner == ".Command" {
            out.push_str(command);
        } else {
            out.push_str(&rest[start..start + end_rel + 2]);
        }
        rest = &rest[start + end_rel + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::events::MemorySink;
    use std::sync::Mutex;

    /// A fake guest: a file system map and a script interpreter that understands a few
    /// commands, enough to check what provisioning sends.
    #[derive(Default)]
    pub struct FakeState {
        pub files: BTreeMap<String, Vec<u8>>,
        pub commands: Vec<(GuestCommand, BTreeMap<String, String>)>,
        pub boot: u32,
        pub powered_off: bool,
    }

    pub struct FakeGuest(pub Arc<Mutex<FakeState>>);

    impl Guest for FakeGuest {
        fn exec(
            &mut self,
            cmd: &GuestCommand,
            env: &BTreeMap<String, String>,
            timeout: Option<Duration>,
            out: &mut dyn FnMut(Stream, &[u8]),
        ) -> Result<ExecOutcome, GuestError> {
            let mut s = self.0.lock().unwrap();
            s.commands.push((cmd.clone(), env.clone()));
            let ok = ExecOutcome {
                code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 0,
            };
            match cmd {
                GuestCommand::Argv(a)
                    if a.get(1).map(String::as_str) == Some("/proc/sys/kernel/random/boot_id") =>
                {
                    out(Stream::Stdout, format!("boot-{}\n", s.boot).as_bytes());
                    Ok(ok)
                }
                GuestCommand::Bash(b) if b.contains("sleep-forever") => Ok(ExecOutcome {
                    code: None,
                    signal: Some(9),
                    timed_out: timeout.is_some(),
                    duration_ms: 0,
                }),
                GuestCommand::Bash(b) if b.contains("exit 3") => {
                    out(Stream::Stdout, b"line one\nline two\n");
                    out(Stream::Stderr, b"oops");
                    Ok(ExecOutcome {
                        code: Some(3),
                        signal: None,
                        timed_out: false,
                        duration_ms: 0,
                    })
                }
                GuestCommand::Bash(b) => {
                    out(
                        Stream::Stdout,
                        format!("ran {} bytes\n", b.len()).as_bytes(),
                    );
                    Ok(ok)
                }
                GuestCommand::Argv(_) => Ok(ok),
            }
        }
        fn put_file(&mut self, path: &str, data: &[u8], _mode: u32) -> Result<(), GuestError> {
            self.0
                .lock()
                .unwrap()
                .files
                .insert(path.into(), data.to_vec());
            Ok(())
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            self.0.lock().unwrap().boot += 1;
            Ok(())
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            self.0.lock().unwrap().powered_off = true;
            Ok(())
        }
    }

    pub struct FakeConnector(pub Arc<Mutex<FakeState>>);

    impl Connector for FakeConnector {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            Ok(Box::new(FakeGuest(self.0.clone())))
        }
    }

    fn step(name: &str, kind: StepKind) -> Step {
        Step {
            name: name.into(),
            timeout: None,
            cache: true,
            kind,
        }
    }

    fn shell(s: &str) -> StepKind {
        StepKind::Shell {
            inline: s.into(),
            env: BTreeMap::new(),
            execute_command: None,
        }
    }

    fn run(steps: &[Step]) -> (Result<(), StepError>, Arc<Mutex<FakeState>>, MemorySink) {
        let dir = tempfile::tempdir().unwrap();
        run_in(steps, dir.path(), BTreeMap::new())
    }

    /// Runs `steps` with the resume flag in `dir` and `extra` files next to `motd`.
    fn run_in(
        steps: &[Step],
        dir: &std::path::Path,
        extra: BTreeMap<String, FileContent>,
    ) -> (Result<(), StepError>, Arc<Mutex<FakeState>>, MemorySink) {
        run_with(steps, dir, extra, None)
    }

    /// [`run_in`], asking `on_failure` after a failed step.
    fn run_with(
        steps: &[Step],
        dir: &std::path::Path,
        extra: BTreeMap<String, FileContent>,
        on_failure: Option<&dyn Fn(&StepFailure) -> AfterFailure>,
    ) -> (Result<(), StepError>, Arc<Mutex<FakeState>>, MemorySink) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let conn = FakeConnector(state.clone());
        let mut files = extra;
        files.insert("motd".to_string(), FileContent::Inline("hi\n".into()));
        let events = MemorySink::default();
        let fetch = |url: &str| -> Result<Vec<u8>, FileFetchError> {
            Err(crate::sources::url::DownloadError::Transfer {
                url: url.into(),
                reason: "no network in tests".into(),
            }
            .into())
        };
        let p = Provisioner {
            vm: "hello",
            steps,
            files: &files,
            connector: &conn,
            events: &events,
            log: None,
            cancel: Arc::new(AtomicBool::new(false)),
            resume_flag: dir.join("resume"),
            fetch_url: &fetch,
            network_ready: &|_: &mut dyn Guest| {
                events.emit(&Event::Note {
                    vm: Some("hello".into()),
                    message: "network ready".into(),
                })
            },
            start: 0,
            after_step: &|index, _, _| {
                events.emit(&Event::Note {
                    vm: None,
                    message: format!("checkpoint {}", index + 1),
                });
                Ok(())
            },
            on_failure,
        };
        let r = p
            .run(conn.connect(Duration::from_secs(1)).unwrap())
            .map(|_| ());
        (r, state, events)
    }

    #[test]
    fn steps_run_in_order_with_files_and_reboot() {
        let steps = vec![
            step(
                "motd",
                StepKind::File {
                    file: "motd".into(),
                    destination: "/etc/motd".into(),
                },
            ),
            step("greet", shell("echo hi > /etc/kiln-hello\n")),
            step("restart", StepKind::Reboot { command: None }),
            step("check", shell("cat /etc/kiln-hello\n")),
        ];
        let (r, state, events) = run(&steps);
        r.unwrap();
        let s = state.lock().unwrap();
        assert_eq!(s.files["/etc/motd"], b"hi\n");
        assert_eq!(s.boot, 1);
        let scripts: Vec<&GuestCommand> = s
            .commands
            .iter()
            .map(|c| &c.0)
            .filter(|c| matches!(c, GuestCommand::Bash(_)))
            .collect();
        assert_eq!(scripts.len(), 2);
        let ev = events.events.lock().unwrap();
        let finished: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                Event::StepFinished { step, ok, .. } => Some((step.clone(), *ok)),
                _ => None,
            })
            .collect();
        assert_eq!(finished.len(), 4);
        assert!(finished.iter().all(|(_, ok)| *ok));
        // After the reboot, the network is made ready again before the next step.
        let order: Vec<String> = ev
            .iter()
            .filter_map(|e| match e {
                Event::StepFinished { step, .. } => Some(format!("done {step}")),
                Event::StepStarted { step, .. } => Some(format!("start {step}")),
                Event::Note { message, .. } if message == "network ready" => Some(message.clone()),
                _ => None,
            })
            .collect();
        let i = order
            .iter()
            .position(|x| x == "network ready")
            .expect("network made ready");
        assert_eq!(order[i - 1], "start restart", "{order:?}");
        assert_eq!(order[i + 1], "done restart", "{order:?}");
        assert_eq!(order.iter().filter(|x| *x == "network ready").count(), 1);
    }

    #[test]
    fn failing_step_names_step_status_and_output() {
        let steps = vec![
            step("first", shell("true\n")),
            step("breaks", shell("echo x; exit 3\n")),
            step("never", shell("echo never\n")),
        ];
        let (r, state, _) = run(&steps);
        let err = r.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("step 2 'breaks'"), "{msg}");
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("line two") && msg.contains("oops"), "{msg}");
        // The third step never ran.
        assert_eq!(state.lock().unwrap().commands.len(), 2);
    }

    /// Runs steps whose second fails, answering with `answers` in turn; returns the result,
    /// the scripts run, the steps asked about and the steps a checkpoint followed.
    fn run_answering(
        steps: &[Step],
        answers: &[AfterFailure],
    ) -> (Result<(), StepError>, Vec<String>, Vec<String>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let answers = Mutex::new(answers.iter().copied().collect::<VecDeque<_>>());
        let asked = Mutex::new(Vec::new());
        let ask = |f: &StepFailure| {
            asked
                .lock()
                .unwrap()
                .push(format!("{} {} {}", f.vm, f.number, f.step.name));
            answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("asked once too often")
        };
        let (r, state, events) = run_with(steps, dir.path(), BTreeMap::new(), Some(&ask));
        let checkpoints = events
            .events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Note { message, .. } => {
                    message.strip_prefix("checkpoint ").map(String::from)
                }
                _ => None,
            })
            .collect();
        let scripts = state
            .lock()
            .unwrap()
            .commands
            .iter()
            .filter_map(|(c, _)| match c {
                GuestCommand::Bash(b) => Some(b.trim().to_string()),
                GuestCommand::Argv(_) => None,
            })
            .collect();
        (r, scripts, asked.into_inner().unwrap(), checkpoints)
    }

    fn failing_second() -> Vec<Step> {
        vec![
            step("first", shell("true\n")),
            step("breaks", shell("exit 3\n")),
            step("last", shell("echo last\n")),
        ]
    }

    #[test]
    fn a_failed_step_retried_runs_again_then_the_rest() {
        let (r, scripts, asked, checkpoints) = run_answering(
            &failing_second(),
            &[AfterFailure::Retry, AfterFailure::Skip],
        );
        r.unwrap();
        assert_eq!(scripts, ["true", "exit 3", "exit 3", "echo last"]);
        assert_eq!(asked, ["hello 2 breaks", "hello 2 breaks"]);
        // The guest now holds what the steps' keys do not say: no layer after step 1.
        assert_eq!(checkpoints, ["1"]);
    }

    #[test]
    fn a_failed_step_skipped_goes_on_with_the_next() {
        let (r, scripts, _, checkpoints) = run_answering(&failing_second(), &[AfterFailure::Skip]);
        r.unwrap();
        assert_eq!(scripts, ["true", "exit 3", "echo last"]);
        assert_eq!(checkpoints, ["1"]);
    }

    #[test]
    fn a_failed_step_aborted_fails_the_run_with_its_error() {
        let (r, scripts, asked, _) = run_answering(&failing_second(), &[AfterFailure::Fail]);
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("step 2 'breaks'") && msg.contains("exit code 3"),
            "{msg}"
        );
        assert_eq!(scripts, ["true", "exit 3"]);
        assert_eq!(asked.len(), 1);
    }

    #[test]
    fn timed_out_step_fails() {
        let mut s = step("slow", shell("sleep-forever\n"));
        s.timeout = Some(Duration::from_secs(1));
        let (r, _, _) = run(&[s]);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("killed after its timeout"), "{msg}");
    }

    #[test]
    fn handbuild_pause_past_its_timeout_fails_the_step() {
        let mut s = step(
            "manual",
            StepKind::Handbuild {
                instructions: "check the console".into(),
            },
        );
        s.timeout = Some(Duration::from_secs(1));
        let after = step("after", shell("echo after\n"));
        let (r, state, events) = run(&[s, after]);
        let err = r.unwrap_err();
        assert!(matches!(err, StepError::PauseTimedOut { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("'manual'") && msg.contains("pause timed out"),
            "{msg}"
        );
        assert!(msg.contains("stepTimeout of 1s"), "{msg}");
        // The step is recorded as failed, and the next step never ran.
        assert!(state.lock().unwrap().commands.is_empty());
        let ev = events.events.lock().unwrap();
        assert!(ev
            .iter()
            .any(|e| matches!(e, Event::StepFinished { step, ok: false, .. } if step == "manual")));
    }

    #[test]
    fn handbuild_pause_ends_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("resume");
        let stop = Arc::new(AtomicBool::new(false));
        // `kiln resume`: keeps writing the flag (the pause removes a stale one as it starts).
        let writer = {
            let (flag, stop) = (flag.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let _ = std::fs::write(&flag, b"");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let mut s = step(
            "manual",
            StepKind::Handbuild {
                instructions: "check".into(),
            },
        );
        s.timeout = Some(Duration::from_secs(60));
        let (r, state, _) = run_in(
            &[s, step("after", shell("echo after\n"))],
            dir.path(),
            BTreeMap::new(),
        );
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        r.unwrap();
        assert_eq!(state.lock().unwrap().commands.len(), 1, "the next step ran");
    }

    #[test]
    fn file_fetched_at_the_start_is_read_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"\x00binary\xff").unwrap();
        let files: BTreeMap<_, _> = [
            (
                "tool".to_string(),
                FileContent::Cached {
                    url: "http://127.0.0.1:1/tool".into(),
                    path: blob,
                },
            ),
            (
                "gone".to_string(),
                FileContent::Cached {
                    url: "http://127.0.0.1:1/gone".into(),
                    path: dir.path().join("missing"),
                },
            ),
        ]
        .into_iter()
        .collect();
        let put = |file: &str| {
            step(
                "put",
                StepKind::File {
                    file: file.into(),
                    destination: "/opt/tool".into(),
                },
            )
        };
        let (r, state, _) = run_in(&[put("tool")], dir.path(), files.clone());
        r.unwrap();
        assert_eq!(state.lock().unwrap().files["/opt/tool"], b"\x00binary\xff");
        let (r, _, _) = run_in(&[put("gone")], dir.path(), files);
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("http://127.0.0.1:1/gone") && msg.contains("missing"),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let s = step(
            "put",
            StepKind::File {
                file: "nope".into(),
                destination: "/x".into(),
            },
        );
        let (r, _, _) = run(&[s]);
        assert!(matches!(r, Err(StepError::NoFile { .. })));
    }

    #[test]
    fn execute_command_wraps_an_uploaded_script() {
        let steps = vec![step(
            "wrapped",
            StepKind::Shell {
                inline: "id\n".into(),
                env: [("A".to_string(), "1".to_string())].into_iter().collect(),
                execute_command: Some("echo pw | sudo -S sh -c '{{ .Command }}'".into()),
            },
        )];
        let (r, state, _) = run(&steps);
        r.unwrap();
        let s = state.lock().unwrap();
        assert_eq!(s.files["/tmp/kiln-step-1.sh"], b"id\n");
        let (cmd, env) = s.commands.last().unwrap();
        assert_eq!(
            cmd,
            &GuestCommand::Bash("echo pw | sudo -S sh -c '/bin/bash /tmp/kiln-step-1.sh'".into())
        );
        assert_eq!(env["A"], "1");
    }

    #[test]
    fn substitution_forms() {
        assert_eq!(substitute_command("{{.Command}}", "X"), "X");
        assert_eq!(substitute_command("a {{ .Command }} b", "X"), "a X b");
        assert_eq!(
            substitute_command("{{ .Other }} {{", "X"),
            "{{ .Other }} {{"
        );
    }
}
