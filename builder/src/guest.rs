//! The builder's view of a guest agent session: what provisioning and capture need, as a
//! trait so they can be tested against a fake guest. [`connect`] opens a real session through
//! the VM's vsock socket with kiln-agent's client.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

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
}

/// Opens sessions to one VM's agent (again after a reboot).
pub trait Connector: Send + Sync {
    /// Waits up to `timeout` for an agent that reports ready.
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Guest>, GuestError>;
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
}
