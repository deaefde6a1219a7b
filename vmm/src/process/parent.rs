//! The parent side: spawn the VMM child and talk to it.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{read_message, write_message, ProtocolError, Request, Response, VmSpec};
use super::CHILD_SUBCOMMAND;
use crate::exit::ExitReason;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("starting the VMM process {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM process exited before it could be controlled ({0})")]
    EarlyExit(std::process::ExitStatus),
    #[error("the VMM process did not open its control socket in time")]
    ConnectTimeout,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the VMM refused: {0}")]
    Refused(String),
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Response>),
    #[error("serializing the VM spec: {0}")]
    Spec(#[from] serde_json::Error),
}

/// A running VMM child process.
pub struct VmProcess {
    child: Child,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    exit: Option<ExitReason>,
    /// When `spawn` started the process.
    pub spawned: Instant,
}

impl VmProcess {
    /// Run `exe __vmm --socket SOCKET --spec JSON` with extra `args` before the subcommand
    /// (for test harnesses), and connect to it. Console output goes to the child's stdout.
    pub fn spawn(exe: &Path, spec: &VmSpec, socket: &Path) -> Result<VmProcess, ProcessError> {
        let mut cmd = Command::new(exe);
        cmd.arg(CHILD_SUBCOMMAND)
            .arg("--socket")
            .arg(socket)
            .arg("--spec")
            .arg(serde_json::to_string(spec)?);
        Self::spawn_command(cmd, socket, spec.console_terminal)
    }

    /// Like [`VmProcess::spawn`] with a prepared command (its arguments must make the
    /// program run [`super::child::run_child`] on `socket`).
    pub fn spawn_command(
        mut cmd: Command,
        socket: &Path,
        terminal: bool,
    ) -> Result<VmProcess, ProcessError> {
        let spawned = Instant::now();
        let _ = std::fs::remove_file(socket);
        cmd.stdin(if terminal {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            exe: format!("{:?}", cmd.get_program()),
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(ProcessError::EarlyExit(status));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(ProcessError::ConnectTimeout);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        };
        let writer = stream.try_clone().map_err(ProtocolError::from)?;
        Ok(VmProcess {
            child,
            writer,
            reader: BufReader::new(stream),
            exit: None,
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn request(&mut self, req: Request) -> Result<Response, ProcessError> {
        if let Some(exit) = &self.exit {
            return Ok(Response::Exited { exit: exit.clone() });
        }
        write_message(&mut self.writer, &req)?;
        let resp: Response = read_message(&mut self.reader)?;
        match resp {
            Response::Exited { exit } => {
                // The VM ended while the request was in flight.
                self.exit = Some(exit.clone());
                Ok(Response::Exited { exit })
            }
            Response::Error { message } => Err(ProcessError::Refused(message)),
            r => Ok(r),
        }
    }

    /// Boot the VM.
    pub fn start(&mut self) -> Result<(), ProcessError> {
        match self.request(Request::Start)? {
            Response::Ok | Response::Exited { .. } => Ok(()),
            r => Err(ProcessError::Unexpected(Box::new(r))),
        }
    }

    pub fn status(&mut self) -> Result<Response, ProcessError> {
        self.request(Request::Status)
    }

    pub fn pause(&mut self) -> Result<(), ProcessError> {
        self.request(Request::Pause).map(|_| ())
    }

    pub fn resume(&mut self) -> Result<(), ProcessError> {
        self.request(Request::Resume).map(|_| ())
    }

    /// Stop the VM and wait for the process.
    pub fn stop(&mut self) -> Result<ExitReason, ProcessError> {
        if self.exit.is_none() {
            // The child may have just exited on its own; its reason then wins.
            let _ = self.request(Request::Stop);
        }
        self.wait()
    }

    /// Wait for the VM to end and the process to exit; the reason comes from the exit
    /// event, or from the exit status if the event was lost (the child crashed).
    pub fn wait(&mut self) -> Result<ExitReason, ProcessError> {
        while self.exit.is_none() {
            match read_message::<Response, _>(&mut self.reader) {
                Ok(Response::Exited { exit }) => self.exit = Some(exit),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let status = self.child.wait().map_err(ProtocolError::from)?;
        Ok(self.exit.clone().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            ExitReason::VmmError {
                detail: match (status.code(), status.signal()) {
                    (_, Some(sig)) => format!("the VMM process was killed by signal {sig}"),
                    (Some(c), _) => {
                        format!("the VMM process exited with status {c} without reporting why")
                    }
                    _ => "the VMM process ended without reporting why".into(),
                },
            }
        }))
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A per-VM socket path under the runtime or temp directory.
pub fn default_socket_path() -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!(
        "kiln-vmm-{}-{}.sock",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ))
}
