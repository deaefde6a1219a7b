//! One host connection: hello first, then one request at a time.

use std::fs::File;
use std::io::{BufReader, Write};
use std::sync::{Arc, Mutex};

use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::message::{ErrorKind, HelloReply, Message, RemoteError};
use crate::transport::{FdStream, Transport};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use super::cleanup;
use super::exec::{self, lock};
use super::files::{self, Upload};
use super::mounts;
use super::netconfig;
use super::power::{self, PowerAction};
use super::sysinfo;
use super::Shared;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("sending to the host failed: {0}")]
    Send(#[from] std::io::Error),
}

type W = Arc<Mutex<FrameWriter<FdStream>>>;

/// Answer a connection beyond the session limit with an error, then close it.
pub fn refuse(stream: FdStream, open: usize) {
    let _ = stream.set_write_timeout_secs(5);
    let mut w = FrameWriter::new(stream);
    let _ = w.send(&Message::Error(RemoteError::new(
        ErrorKind::Unavailable,
        format!("the agent already serves {open} sessions; try again later"),
    )));
}

impl FdStream {
    fn set_write_timeout_secs(&self, secs: i64) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: secs as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(self),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

pub fn run(stream: FdStream, id: u64, shared: &Shared) {
    // A host that stops reading for this long is treated as gone (the command is killed).
    // Small read buffer: frame bodies larger than it are read straight into the frame
    // buffer instead of being copied through it.
    let _ = stream.set_write_timeout_secs(300);
    let (read_half, write_half, watch) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(watch)) => (stream, w, watch),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(session = id, "cannot duplicate the session socket: {e}");
            return;
        }
    };
    let mut s = Session {
        id,
        reader: FrameReader::new(BufReader::with_capacity(16 * 1024, read_half)),
        writer: Arc::new(Mutex::new(FrameWriter::new(write_half))),
        watch,
        shared,
        greeted: false,
        version: PROTOCOL_VERSION,
    };
    tracing::debug!(session = id, "session opened");
    let served = s.serve();
    // Thawed before anything is logged: the log may live on a frozen file system.
    shared.freezes.session_ended(id);
    match served {
        Ok(()) => tracing::debug!(session = id, "session closed by the host"),
        Err(e) => {
            tracing::warn!(session = id, "session ended: {e}");
            if !matches!(e, End::Send(_) | End::Frame(FrameError::Io(_))) {
                let _ = lock(&s.writer).send(&Message::Error(RemoteError::new(
                    ErrorKind::Protocol,
                    e.to_string(),
                )));
            }
        }
    }
    let _ = s.watch.shutdown();
}

struct Session<'a> {
    id: u64,
    reader: FrameReader<BufReader<FdStream>>,
    writer: W,
    /// A third handle on the socket, for the exec pump to watch for hang-ups.
    watch: FdStream,
    shared: &'a Shared,
    greeted: bool,
    /// The protocol version hello agreed on.
    version: u16,
}

impl Session<'_> {
    fn read(&mut self) -> Result<Option<Message>, End> {
        match self.reader.read() {
            Ok(m) => Ok(Some(m)),
            Err(FrameError::Closed) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn send(&self, m: &Message) -> Result<(), End> {
        lock(&self.writer).send(m)?;
        Ok(())
    }

    fn serve(&mut self) -> Result<(), End> {
        let mut pending: Option<Message> = None;
        loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match self.read()? {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            if !self.greeted && !matches!(msg, Message::Hello(_)) {
                return Err(End::Protocol(format!(
                    "the first message must be hello, got {}",
                    msg.name()
                )));
            }
            match msg {
                Message::Hello(h) => {
                    // The newest version both sides speak.
                    let version = h.max_version.min(PROTOCOL_VERSION);
                    if version < h.min_version.max(MIN_PROTOCOL_VERSION) {
                        return Err(End::Protocol(format!(
                            "no common protocol version: the host speaks {}..={}, this agent {}..={}",
                            h.min_version, h.max_version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
                        )));
                    }
                    self.version = version;
                    if !self.greeted {
                        tracing::info!(session = self.id, client = %h.client, "hello");
                    }
                    self.greeted = true;
                    self.send(&Message::HelloReply(self.hello_reply()))?;
                }
                Message::Exec(req) => pending = self.exec(req)?,
                Message::PutFile(req) => self.put(req)?,
                Message::GetFile(path) => {
                    let mut w = lock(&self.writer);
                    if let Err(e) = files::send_file(&path, &mut w)? {
                        w.send(&Message::Error(e))?;
                    }
                }
                Message::Stat(s) => {
                    let reply = match files::stat(&s.path, s.follow_symlinks) {
                        Ok(st) => Message::StatReply(st),
                        Err(e) => Message::Error(e),
                    };
                    self.send(&reply)?;
                }
                Message::NetConfig(links) => {
                    let reply = match netconfig::configure(&links) {
                        Ok(done) => {
                            tracing::info!(session = self.id, "network configured: {done}");
                            Message::Ack
                        }
                        Err(e) => {
                            tracing::info!(session = self.id, "network left to the guest: {e}");
                            Message::Error(e)
                        }
                    };
                    self.send(&reply)?;
                }
                Message::Sync => {
                    // SAFETY: sync(2) has no arguments and cannot fail.
                    unsafe { libc::sync() };
                    self.send(&Message::Ack)?;
                }
                Message::Cleanup(plan) => {
                    let report = cleanup::run(&plan, &mut cleanup::Context::system());
                    tracing::info!(
                        session = self.id,
                        actions = plan.actions.len(),
                        failures = report.failures.len(),
                        trimmed = report.trimmed_bytes,
                        ms = report.duration_ms,
                        "cleanup done"
                    );
                    self.send(&Message::CleanupDone(report))?;
                }
                Message::Freeze => {
                    // Not logged here: the file systems may be frozen now (see freeze.rs).
                    let reply = match self.shared.freezes.freeze(self.id) {
                        Ok(points) => Message::Frozen(points),
                        Err(e) => Message::Error(e),
                    };
                    self.send(&reply)?;
                }
                Message::Thaw => {
                    let reply = match self.shared.freezes.thaw(self.id) {
                        Ok(points) => Message::Thawed(points),
                        Err(e) => Message::Error(e),
                    };
                    self.send(&reply)?;
                }
                Message::Reboot | Message::Poweroff | Message::PoweroffNow => {
                    let kind = match msg {
                        Message::Reboot => power::Kind::Reboot,
                        Message::Poweroff => power::Kind::Poweroff,
                        _ => power::Kind::PoweroffNow,
                    };
                    if self.shared.config.power == PowerAction::Disabled {
                        self.send(&Message::Error(RemoteError::new(
                            ErrorKind::Unavailable,
                            "power actions are disabled on this agent (it does not listen on vsock; see --power-action)",
                        )))?;
                        continue;
                    }
                    tracing::info!(session = self.id, ?kind, "acknowledged; carrying it out");
                    self.send(&Message::Ack)?;
                    power::schedule(self.shared.config.power, kind);
                }
                // Leftovers of an exec that already ended (the host's stdin feeder may still
                // have been sending when the exit arrived).
                Message::StdinData(_)
                | Message::StdinClose
                | Message::Signal(_)
                | Message::Resize(_) => {}
                other => {
                    return Err(End::Protocol(format!(
                        "{} is not a request the agent accepts here",
                        other.name()
                    )))
                }
            }
        }
    }

    fn hello_reply(&self) -> HelloReply {
        let config = &self.shared.config;
        let mut missing: Vec<String> = config
            .ready_when
            .iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if let Some(root) = &config.mounts_root {
            missing.extend(
                mounts::pending(root)
                    .into_iter()
                    .map(|p| format!("{p} to be mounted")),
            );
        }
        HelloReply {
            version: self.version,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            guest: sysinfo::guest_info(),
            ready: missing.is_empty(),
            readiness: if missing.is_empty() {
                "ready".to_string()
            } else {
                format!("waiting for {}", missing.join(", "))
            },
            uptime_ms: sysinfo::uptime_ms(),
            boot_id: if self.version >= 2 {
                sysinfo::boot_id()
            } else {
                String::new()
            },
        }
    }

    /// Run one command. Returns a request that arrived after it ended, to handle next.
    fn exec(&mut self, req: crate::message::ExecRequest) -> Result<Option<Message>, End> {
        let mut started = match exec::spawn(&req, &self.shared.config) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(session = self.id, "exec refused: {e}");
                self.send(&Message::Error(e))?;
                return Ok(None);
            }
        };
        let pid = started.pid;
        let tty = started.tty.take();
        tracing::debug!(session = self.id, pid, "exec started");
        // ExecStarted goes out before the pump can send output.
        // On any failure before the pump runs, the command is killed and reaped.
        if let Err(e) = self.send(&Message::ExecStarted { pid }) {
            started.abort();
            return Err(e);
        }
        let watch = match self.watch.try_clone() {
            Ok(w) => w,
            Err(e) => {
                started.abort();
                return Err(e.into());
            }
        };
        let (running, mut stdin) = started.run(self.writer.clone(), watch, self.id)?;
        loop {
            let msg = match self.read() {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if !running.is_finished() {
                        tracing::info!(
                            session = self.id,
                            pid,
                            "host disconnected mid-command: killing it"
                        );
                    }
                    running.abort();
                    return Ok(None);
                }
                Err(e) => {
                    running.abort();
                    return Err(e);
                }
            };
            match msg {
                Message::StdinData(d) => write_stdin(&mut stdin, &d),
                Message::StdinClose => stdin = None,
                Message::Resize(size) => {
                    // A resize for a command without a terminal means nothing: ignored.
                    if let Some(t) = &tty {
                        if let Err(e) = super::pty::set_size(t, size) {
                            tracing::debug!(session = self.id, pid, "resize failed: {e}");
                        }
                    }
                }
                Message::Signal(sig) => {
                    if !(1..=64).contains(&sig) {
                        running.abort();
                        return Err(End::Protocol(format!("signal {sig} is out of range")));
                    }
                    if !running.is_finished() {
                        exec::kill_group(pid, sig);
                    }
                }
                other if running.is_finished() => {
                    running.join();
                    return Ok(Some(other));
                }
                other => {
                    running.abort();
                    return Err(End::Protocol(format!(
                        "{} arrived while a command was running",
                        other.name()
                    )));
                }
            }
        }
    }

    fn put(&mut self, req: crate::message::PutFileRequest) -> Result<(), End> {
        let mut up = match Upload::begin(req, &self.shared.config.etc_dir) {
            Ok(u) => u,
            Err(e) => {
                self.send(&Message::Error(e))?;
                return Ok(());
            }
        };
        self.send(&Message::Ack)?;
        loop {
            // A read error or disconnect drops `up`, which removes the temporary file.
            // File data is taken straight from the frame buffer (no copy into a Message).
            let msg = match self.reader.read_raw() {
                Ok((crate::message::ty::FILE_DATA, body)) => {
                    up.data(body);
                    continue;
                }
                Ok((t, body)) => Message::decode(t, body)?,
                Err(FrameError::Closed) => {
                    return Err(End::Protocol(
                        "the host disconnected in the middle of an upload".into(),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            match msg {
                Message::FileEnd(end) => {
                    let reply = match up.finish(end) {
                        Ok(done) => Message::PutDone(done),
                        Err(e) => Message::Error(e),
                    };
                    return self.send(&reply);
                }
                other => {
                    return Err(End::Protocol(format!(
                        "{} arrived in the middle of an upload",
                        other.name()
                    )))
                }
            }
        }
    }
}

fn write_stdin(stdin: &mut Option<File>, d: &[u8]) {
    if let Some(s) = stdin.as_mut() {
        // The command may have closed its stdin or exited: stop feeding it, quietly.
        if s.write_all(d).is_err() {
            *stdin = None;
        }
    }
}
