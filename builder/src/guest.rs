//! The builder's view of a guest agent session: what provisioning and capture need, as a
//! trait so they can be tested against a fake guest. [`connect`] opens a real session through
//! the VM's vsock socket with kiln-agent's client.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::events::Stream;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent did not answer within {waited:?}: {last}")]
    NotReady { waited: Duration, last: String },
    #[error("agent: {0}")]
    Agent(String),
    #[error("the connection to the agent was lost: {0}")]
    Lost(String),
    #[error("{0}")]
    NotAvailable(String),
    /// The guest answered and turned the build away for good (an SSH login refused, a
    /// changed host key): waiting longer cannot help.
    #[error("{0}")]
    Refused(String),
}

/// How a command ended: kiln-agent's own exit status (code, signal, timeout, duration).
pub use kiln_agent::ExitStatus as ExecOutcome;

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestCommand {
    /// A bash script body.
    Bash(String),
    /// A program and its arguments.
    Argv(Vec<String>),
}

/// One agent session.
pub trait Guest: Send {
    /// Runs a command; output is passed to `out` as it arrives.
    fn exec(
        &mut self,
        cmd: &GuestCommand,
        env: &BTreeMap<String, String>,
        timeout: Option<Duration>,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError>;
    /// Writes a file (atomically, parents created).
    fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError>;
    /// Asks the guest to reboot; returns on the agent's acknowledgement.
    fn reboot(&mut self) -> Result<(), GuestError>;
    /// Asks the guest to power off; returns on the agent's acknowledgement.
    fn poweroff(&mut self) -> Result<(), GuestError>;
    /// Asks the guest to power off without stopping its services (a capture after the
    /// template cleanup); returns on the agent's acknowledgement.
    fn poweroff_now(&mut self) -> Result<(), GuestError> {
        self.poweroff()
    }
    /// Runs a template cleanup plan inside the agent (no process is started in the guest).
    /// [`CleanupOutcome::Unsupported`] means the agent predates the request: the session
    /// may be closed, and the caller falls back to its scripts on a new one. The default is
    /// a guest without the request.
    fn cleanup(&mut self, _plan: &CleanupPlan) -> Result<CleanupOutcome, GuestError> {
        Ok(CleanupOutcome::Unsupported(
            "this guest has no cleanup request".into(),
        ))
    }
    /// Syncs and freezes the guest's writable disk file systems inside the agent (no
    /// process is started in the guest); the agent thaws them by itself after a minute or
    /// when this session ends. [`FreezeOutcome::Unsupported`] leaves the session usable:
    /// the caller then freezes with a script. The default is a guest without the request.
    fn freeze(&mut self) -> Result<FreezeOutcome, GuestError> {
        Ok(FreezeOutcome::Unsupported(
            "this guest has no freeze request".into(),
        ))
    }
    /// Thaws what [`Guest::freeze`] froze. Nothing frozen any more (the agent thawed by
    /// itself) is not an error: the guest runs either way.
    fn thaw(&mut self) -> Result<(), GuestError> {
        Err(GuestError::NotAvailable(
            "this guest has no thaw request".into(),
        ))
    }
    /// Reads a small guest file whole, with its permission bits; None when it does not
    /// exist; an error when it is larger than `max` bytes. `NotAvailable` when this guest
    /// cannot read files (the caller then uses a script).
    fn read_file(&mut self, _path: &str, _max: u64) -> Result<Option<(Vec<u8>, u32)>, GuestError> {
        Err(GuestError::NotAvailable(
            "this guest cannot read files".into(),
        ))
    }
    /// Gives the guest's NICs these addresses now (leases the build network has bound for
    /// them). An error means the guest keeps to its own DHCP client; an agent too old to know
    /// the request may close the session, so unless [`Guest::takes_net_config`] callers use
    /// a session of its own.
    fn net_config(&mut self, _links: &[kiln_agent::LinkConfig]) -> Result<(), GuestError> {
        Err(GuestError::NotAvailable(
            "this guest cannot be handed its network".into(),
        ))
    }
    /// Whether this session knows `net_config` (an agent of protocol 2 or later), so the
    /// request cannot cost it the session.
    fn takes_net_config(&self) -> bool {
        false
    }
    /// The boot id the guest reported when this session opened (agents of protocol 2 or
    /// later); None when it did not, and the caller reads it with a command.
    fn reported_boot_id(&self) -> Option<String> {
        None
    }
}

pub use kiln_agent::message::{CleanupAction, CleanupPlan, CleanupReport};

/// How long the agent may take over a cleanup plan.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(300);

/// What [`Guest::cleanup`] got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupOutcome {
    /// The agent ran the plan; the report names the steps that failed (best effort).
    Done(CleanupReport),
    /// The agent does not know the request (it is older); the reason, in words.
    Unsupported(String),
}

/// How long a freeze or a thaw may take (a script's, or the agent's request).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Guest::freeze`] got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// The mount points frozen, deepest first; empty when there was nothing to freeze.
    Frozen(Vec<String>),
    /// The agent does not know the request (it is older); the reason, in words.
    Unsupported(String),
}

/// How long one try of [`Connector::connect_until`] may wait, so a cancel is seen within about
/// a second even while the guest is still booting.
pub const CONNECT_TRY: Duration = Duration::from_secs(1);
/// The pause after a try that failed fast (no socket yet), so the wait does not spin.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(100);
/// The pause after a session `accept` turned down (e.g. the guest has not gone down for its
/// reboot yet): the agent is up, so asking it again at once only loads a slow guest.
const PAUSE_AFTER_REJECT: Duration = Duration::from_millis(500);

/// Why [`Connector::connect_until`] ended without a session.
#[derive(Debug)]
pub enum WaitError {
    /// The cancel flag was set.
    Cancelled,
    /// `limit` passed; `last` is why the last try failed (the connect error, or what `accept`
    /// said of the session).
    TimedOut { waited: Duration, last: GuestError },
    /// A try ended in [`GuestError::Refused`]: reported at once, not at the limit.
    Refused(GuestError),
}

impl From<WaitError> for GuestError {
    /// A cancel is a lost session; a timeout is the last try's own error.
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Cancelled => GuestError::Lost("cancelled".into()),
            WaitError::TimedOut { last, .. } | WaitError::Refused(last) => last,
        }
    }
}

/// Opens sessions to one VM's agent (again after a reboot).
pub trait Connector: Send + Sync {
    /// Waits up to `timeout` for an agent that reports ready.
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Guest>, GuestError>;

    /// Tries to connect, [`CONNECT_TRY`] at a time, until a session that `accept` takes
    /// (`Ok(())`) is open, `limit` has passed, or `cancel` is set. `accept` turns a session
    /// down with the reason (`Err`); that reason is reported if the time runs out. At least
    /// one try is made; a try the guest refuses ([`GuestError::Refused`]) ends the wait.
    fn connect_until(
        &self,
        limit: Duration,
        cancel: &AtomicBool,
        accept: &mut dyn FnMut(&mut dyn Guest) -> Result<(), GuestError>,
    ) -> Result<Box<dyn Guest>, WaitError> {
        let start = Instant::now();
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(WaitError::Cancelled);
            }
            let left = limit.saturating_sub(start.elapsed());
            let (last, pause) = match self.connect(left.min(CONNECT_TRY)) {
                Ok(mut g) => match accept(&mut *g) {
                    Ok(()) => return Ok(g),
                    Err(e) => (e, PAUSE_AFTER_REJECT),
                },
                Err(e @ GuestError::Refused(_)) => return Err(WaitError::Refused(e)),
                Err(e) => (e, PAUSE_AFTER_FAILURE),
            };
            if start.elapsed() >= limit {
                return Err(WaitError::TimedOut {
                    waited: start.elapsed(),
                    last,
                });
            }
            std::thread::sleep(pause);
        }
    }
}

/// Connects through a VM's vsock Unix socket.
pub struct VsockConnector {
    pub socket: std::path::PathBuf,
    pub port: u32,
}

impl VsockConnector {
    pub fn new(socket: &Path, port: u32) -> Self {
        Self {
            socket: socket.to_path_buf(),
            port,
        }
    }
}

impl Connector for VsockConnector {
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Guest>, GuestError> {
        let sock = self.socket.clone();
        let port = self.port;
        let client = kiln_agent::Client::connect_when_ready(
            || kiln_agent::Client::connect_vsock_uds(&sock, port, Duration::from_secs(5)),
            timeout,
        )
        .map_err(|e| match e {
            kiln_agent::ClientError::NotReady { waited, last } => {
                GuestError::NotReady { waited, last }
            }
            other => GuestError::Agent(other.to_string()),
        })?;
        Ok(Box::new(AgentGuest(client)))
    }
}

/// A session with kiln's agent.
pub struct AgentGuest(pub kiln_agent::Client);

impl AgentGuest {
    /// Makes one request that may take up to `limit` (a guest that hangs fails it instead of
    /// holding the build forever); the inner error is the reason an older agent gave for not
    /// knowing the request.
    fn within<T>(
        &mut self,
        limit: Duration,
        request: impl FnOnce(&mut kiln_agent::Client) -> Result<T, kiln_agent::ClientError>,
    ) -> Result<Result<T, String>, GuestError> {
        self.0.set_read_timeout(Some(limit)).map_err(agent_err)?;
        let r = request(&mut self.0);
        let _ = self.0.set_read_timeout(None);
        match r {
            Ok(v) => Ok(Ok(v)),
            Err(kiln_agent::ClientError::Unsupported { reason, .. }) => Ok(Err(reason)),
            Err(e) => Err(agent_err(e)),
        }
    }
}

fn agent_err(e: kiln_agent::ClientError) -> GuestError {
    match e {
        kiln_agent::ClientError::Frame(_)
        | kiln_agent::ClientError::Send(_)
        | kiln_agent::ClientError::Broken => GuestError::Lost(e.to_string()),
        other => GuestError::Agent(other.to_string()),
    }
}

impl Guest for AgentGuest {
    fn exec(
        &mut self,
        cmd: &GuestCommand,
        env: &BTreeMap<String, String>,
        timeout: Option<Duration>,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError> {
        let mut req = match cmd {
            GuestCommand::Bash(body) => {
                kiln_agent::ExecRequest::script(kiln_agent::Interpreter::Bash, body.clone())
            }
            GuestCommand::Argv(a) => kiln_agent::ExecRequest::argv(a.clone()),
        };
        for (k, v) in env {
            req = req.env(k.clone(), v.clone());
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let st = self
            .0
            .exec(&req, None, |s, d| {
                let s = match s {
                    kiln_agent::OutputStream::Stdout => Stream::Stdout,
                    kiln_agent::OutputStream::Stderr => Stream::Stderr,
                };
                out(s, d)
            })
            .map_err(agent_err)?;
        Ok(st)
    }

    fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError> {
        let opts = kiln_agent::PutOptions {
            mode,
            create_dirs: true,
            ..Default::default()
        };
        let mut r = data;
        self.0
            .put_reader(&mut r, path, &opts, Some(data.len() as u64))
            .map_err(agent_err)?;
        Ok(())
    }

    fn reboot(&mut self) -> Result<(), GuestError> {
        self.0.reboot().map_err(agent_err)
    }

    fn poweroff(&mut self) -> Result<(), GuestError> {
        self.0.poweroff().map_err(agent_err)
    }

    fn poweroff_now(&mut self) -> Result<(), GuestError> {
        self.0.poweroff_now().map_err(agent_err)
    }

    fn cleanup(&mut self, plan: &CleanupPlan) -> Result<CleanupOutcome, GuestError> {
        // The script this replaces had 300 s; a guest that hangs (FITRIM on a slow disk, a
        // wedged file system) fails the capture instead of holding the build forever.
        match self.within(CLEANUP_TIMEOUT, |c| c.cleanup(plan))? {
            Ok(r) => Ok(CleanupOutcome::Done(r)),
            Err(reason) => Ok(CleanupOutcome::Unsupported(reason)),
        }
    }

    fn freeze(&mut self) -> Result<FreezeOutcome, GuestError> {
        match self.within(FREEZE_TIMEOUT, kiln_agent::Client::freeze)? {
            Ok(points) => Ok(FreezeOutcome::Frozen(points)),
            Err(reason) => Ok(FreezeOutcome::Unsupported(reason)),
        }
    }

    fn thaw(&mut self) -> Result<(), GuestError> {
        let thawed = self.within(FREEZE_TIMEOUT, |c| match c.thaw() {
            // Nothing frozen any more: the agent's own watchdog thawed, and says when.
            Err(kiln_agent::ClientError::Remote(e))
                if e.kind == kiln_agent::message::ErrorKind::InvalidRequest =>
            {
                Ok(Some(e.message))
            }
            r => r.map(|_| None),
        })?;
        match thawed {
            Ok(None) => Ok(()),
            Ok(Some(why)) => {
                tracing::warn!("thaw: {why}");
                Ok(())
            }
            Err(reason) => Err(GuestError::NotAvailable(reason)),
        }
    }

    fn read_file(&mut self, path: &str, max: u64) -> Result<Option<(Vec<u8>, u32)>, GuestError> {
        /// Keeps at most `max` bytes and then refuses (the client keeps the session in step).
        struct Capped(Vec<u8>, u64);
        impl std::io::Write for Capped {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.0.len() as u64 + b.len() as u64 > self.1 {
                    return Err(std::io::Error::other(format!(
                        "larger than {} bytes",
                        self.1
                    )));
                }
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = Capped(Vec::new(), max);
        match self.0.get_to_writer(path, &mut out) {
            Ok((meta, _)) => Ok(Some((out.0, meta.mode & 0o7777))),
            Err(kiln_agent::ClientError::Remote(e))
                if e.kind == kiln_agent::message::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(agent_err(e)),
        }
    }

    fn net_config(&mut self, links: &[kiln_agent::LinkConfig]) -> Result<(), GuestError> {
        self.0.net_config(links.to_vec()).map_err(agent_err)
    }

    fn takes_net_config(&self) -> bool {
        self.0.hello().version >= 2
    }

    fn reported_boot_id(&self) -> Option<String> {
        let id = &self.0.hello().boot_id;
        (!id.is_empty()).then(|| id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::tests::FakeGuest;
    use std::sync::{Arc, Mutex};

    /// Fails its first `fail` connects, then opens sessions; counts the tries.
    struct Flaky {
        fail: usize,
        tries: Mutex<usize>,
    }

    impl Connector for Flaky {
        fn connect(&self, timeout: Duration) -> Result<Box<dyn Guest>, GuestError> {
            let mut n = self.tries.lock().unwrap();
            *n += 1;
            if *n <= self.fail {
                return Err(GuestError::NotReady {
                    waited: timeout,
                    last: format!("try {n}"),
                });
            }
            Ok(Box::new(FakeGuest(Arc::default())))
        }
    }

    fn flaky(fail: usize) -> Flaky {
        Flaky {
            fail,
            tries: Mutex::new(0),
        }
    }

    #[test]
    fn connect_until_retries_until_a_session_opens() {
        let c = flaky(3);
        let never = AtomicBool::new(false);
        let r = c.connect_until(Duration::from_secs(30), &never, &mut |_| Ok(()));
        assert!(r.is_ok());
        assert_eq!(*c.tries.lock().unwrap(), 4);
    }

    #[test]
    fn connect_until_keeps_trying_while_accept_turns_sessions_down() {
        let c = flaky(0);
        let never = AtomicBool::new(false);
        let mut seen = 0;
        let r = c.connect_until(Duration::from_secs(30), &never, &mut |_| {
            seen += 1;
            if seen < 3 {
                Err(GuestError::NotAvailable("old boot".into()))
            } else {
                Ok(())
            }
        });
        assert!(r.is_ok());
        assert_eq!(seen, 3);
        assert_eq!(*c.tries.lock().unwrap(), 3);
    }

    #[test]
    fn connect_until_times_out_with_the_last_reason() {
        let c = flaky(usize::MAX);
        let never = AtomicBool::new(false);
        let start = Instant::now();
        let r = c.connect_until(Duration::from_millis(350), &never, &mut |_| Ok(()));
        let Err(WaitError::TimedOut { waited, last }) = r else {
            panic!("expected a timeout");
        };
        assert!(waited >= Duration::from_millis(350), "{waited:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let tries = *c.tries.lock().unwrap();
        assert!(tries >= 2, "{tries} tries");
        // The timeout carries the last try's own error, unchanged.
        let shown = last.to_string();
        assert!(
            matches!(&last, GuestError::NotReady { last, .. } if *last == format!("try {tries}")),
            "{shown}"
        );
        assert_eq!(
            GuestError::from(WaitError::TimedOut { waited, last }).to_string(),
            shown
        );

        // A rejected session is the reason reported when time runs out.
        let c = flaky(0);
        let r = c.connect_until(Duration::ZERO, &never, &mut |_| {
            Err(GuestError::NotAvailable("not yet".into()))
        });
        let Err(WaitError::TimedOut { last, .. }) = r else {
            panic!("expected a timeout");
        };
        assert_eq!(last.to_string(), "not yet");
        assert_eq!(*c.tries.lock().unwrap(), 1, "at least one try is made");
    }

    #[test]
    fn connect_until_stops_on_cancel() {
        let c = flaky(usize::MAX);
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                cancel.store(true, Ordering::SeqCst);
            });
            let r = c.connect_until(Duration::from_secs(60), &cancel, &mut |_| Ok(()));
            assert!(matches!(r, Err(WaitError::Cancelled)));
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(
            GuestError::from(WaitError::Cancelled).to_string(),
            "the connection to the agent was lost: cancelled"
        );
    }
}
