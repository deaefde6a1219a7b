//! The host-side client: synchronous, one request at a time per connection. Open several
//! connections for concurrent work (the agent serves each in its own thread).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::frame::{FrameError, FrameReader, FrameWriter, DATA_CHUNK};
use crate::message::{
    ty, ExecRequest, ExitStatus, FileEnd, FileMeta, FileStat, Hello, HelloReply, Message,
    PutFileRequest, RemoteError, StatRequest, WindowSize,
};
use crate::transport::{self, HandshakeError, Transport};
use crate::PROTOCOL_VERSION;

/// Errors the client returns.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent stream: {0}")]
    Frame(#[from] FrameError),
    #[error("sending to the agent failed: {0}")]
    Send(#[source] io::Error),
    #[error("the agent reported an error: {0}")]
    Remote(#[from] RemoteError),
    #[error("protocol violation: expected {expected}, the agent sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("checksum mismatch on {path}: expected {expected}, got {actual}")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch on {path}: expected {expected} bytes, got {actual}")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("local file {path}: {source}")]
    Local { path: String, source: io::Error },
    #[error("the guest was not ready after {waited:?}: {last}")]
    NotReady { waited: Duration, last: String },
    #[error("this connection is unusable after an earlier stream error")]
    Broken,
    /// The agent is older than the request (it answered "unknown frame type" and closed the
    /// session): the caller may fall back to an older way on a new connection.
    #[error("the agent does not know the {request} request (an older agent): {reason}")]
    Unsupported {
        request: &'static str,
        reason: String,
    },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Collected output of a command.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Options for uploads.
#[derive(Debug, Clone)]
pub struct PutOptions {
    pub mode: u32,
    /// `user`, `user:group` or `:group` (names or numbers) resolved in the guest.
    pub owner: Option<String>,
    pub fsync: bool,
    pub create_dirs: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            mode: 0o644,
            owner: None,
            fsync: true,
            create_dirs: false,
        }
    }
}

/// A connection to one agent session.
pub struct Client {
    reader: FrameReader<BufReader<Box<dyn Transport>>>,
    writer: FrameWriter<Box<dyn Transport>>,
    hello: HelloReply,
    broken: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("hello", &self.hello)
            .finish()
    }
}

impl Client {
    /// Speak the protocol over any splittable stream: sends hello, reads the reply.
    pub fn new<S: Transport>(stream: S) -> Result<Client> {
        let write_half = stream.try_clone_transport().map_err(ClientError::Send)?;
        let read_half: Box<dyn Transport> = Box::new(stream);
        let mut c = Client {
            reader: FrameReader::new(BufReader::with_capacity(16 * 1024, read_half)),
            writer: FrameWriter::new(write_half),
            hello: HelloReply {
                version: 0,
                agent_version: String::new(),
                guest: Default::default(),
                ready: false,
                readiness: String::new(),
                uptime_ms: 0,
                boot_id: String::new(),
            },
            broken: false,
        };
        c.hello = c.refresh_hello()?;
        Ok(c)
    }

    /// Connect to an agent listening on a Unix socket (tests, or a local agent).
    pub fn connect_unix(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Client::new(s)
    }

    /// Connect through a VM's vsock Unix socket (`CONNECT <port>` handshake), then hello.
    pub fn connect_vsock_uds(path: &Path, port: u32, timeout: Duration) -> Result<Client> {
        let s = transport::connect_vsock_uds(path, port, timeout)?;
        s.set_read_timeout(Some(timeout))
            .map_err(ClientError::Send)?;
        let mut c = Client::new(s)?;
        c.set_read_timeout(None)?;
        Ok(c)
    }

    /// Call `connect` until it succeeds with a guest that reports ready, or `timeout`
    /// passes. Used while a guest boots: the vsock socket refuses until the agent listens.
    pub fn connect_when_ready<F>(mut connect: F, timeout: Duration) -> Result<Client>
    where
        F: FnMut() -> Result<Client>,
    {
        let start = Instant::now();
        let mut last;
        loop {
            match connect() {
                Ok(mut c) => {
                    // Re-ask on the same connection while the guest finishes booting.
                    loop {
                        if c.hello.ready {
                            return Ok(c);
                        }
                        last = format!("agent answers but is not ready: {}", c.hello.readiness);
                        if start.elapsed() >= timeout {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        if let Err(e) = c.refresh_hello() {
                            last = e.to_string();
                            break;
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() >= timeout {
                return Err(ClientError::NotReady {
                    waited: start.elapsed(),
                    last,
                });
            }
            // A refused connection costs the guest one reset packet: asking often makes the
            // agent's first moment of listening count.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's last hello reply (versions, guest facts, readiness).
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Bound how long any read from the agent may block (None: forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .get_ref()
            .set_read_timeout(t)
            .map_err(ClientError::Send)
    }

    /// Send hello again (readiness changes as the guest boots).
    pub fn refresh_hello(&mut self) -> Result<HelloReply> {
        let hello = Message::Hello(Hello {
            min_version: crate::MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: format!("kiln-agent client {}", env!("CARGO_PKG_VERSION")),
        });
        if let Err(send_err) = self.send(&hello) {
            // An agent that refuses the session (too many sessions, no common version) may
            // answer and close before our hello arrives; its reason is still waiting to be
            // read and says more than the broken pipe.
            if let Ok(Message::Error(e)) = self.reader.read() {
                return Err(e.into());
            }
            return Err(send_err);
        }
        match self.recv()? {
            Message::HelloReply(r) => {
                self.hello = r.clone();
                Ok(r)
            }
            // Version mismatch or too many sessions: the agent closes the stream after it.
            Message::Error(e) => {
                self.broken = true;
                Err(e.into())
            }
            other => self.unexpected("hello-reply", &other),
        }
    }

    /// Run a command. Output chunks go to `on_output` as they arrive, each stream in order.
    /// `stdin`, when given, is streamed to the command until it reaches EOF (it runs on its
    /// own thread while output is read, so a command that echoes its input cannot
    /// deadlock). The agent enforces `req.timeout` by killing the whole process group.
    pub fn exec<F>(
        &mut self,
        req: &ExecRequest,
        stdin: Option<&mut (dyn Read + Send)>,
        mut on_output: F,
    ) -> Result<ExitStatus>
    where
        F: FnMut(OutputStream, &[u8]),
    {
        let mut req = req.clone();
        req.stdin = stdin.is_some();
        let feeder = stdin.map(|input| {
            move |w: &mut FrameWriter<Box<dyn Transport>>, done: &AtomicBool| {
                // A feeder error after the command ended (EPIPE: it stopped reading) is
                // not the command's failure; the exit status says what happened.
                let _ = feed_stdin(input, w, done);
            }
        });
        self.run_command(req, feeder, &mut on_output)
    }

    /// Run a command on a terminal (`req.tty` must be set; protocol 3). `feed` runs on a
    /// thread of its own with the command's input side: it sends keystrokes and window
    /// sizes until [`TtyInput::done`] says the command ended, and must then return (it
    /// should not block longer than a moment at a time). The terminal's output, one
    /// stream, goes to `on_output` as it arrives.
    pub fn exec_tty<F, O>(
        &mut self,
        req: &ExecRequest,
        feed: F,
        mut on_output: O,
    ) -> Result<ExitStatus>
    where
        F: FnOnce(TtyInput<'_>) + Send,
        O: FnMut(&[u8]),
    {
        if req.tty.is_none() {
            return Err(ClientError::Remote(RemoteError::new(
                crate::message::ErrorKind::InvalidRequest,
                "exec_tty needs a request with a terminal",
            )));
        }
        // An older agent would end the session on the unknown field: say so before asking.
        if self.hello.version < 3 {
            return Err(ClientError::Unsupported {
                request: "exec on a terminal",
                reason: format!(
                    "the agent (version {}) speaks protocol {}; terminals need protocol 3, \
                     in guests made from a base bootstrapped by a newer kiln",
                    self.hello.agent_version, self.hello.version
                ),
            });
        }
        let mut req = req.clone();
        req.stdin = true;
        req.merge_stderr = true;
        let feeder = move |w: &mut FrameWriter<Box<dyn Transport>>, done: &AtomicBool| {
            feed(TtyInput { writer: w, done })
        };
        self.run_command(req, Some(feeder), &mut |_, d| on_output(d))
    }

    /// Sends an exec request, then reads the command's output until it exits while `feeder`
    /// (on a thread of its own) sends its input; the feeder must return soon after the flag
    /// it is given is set.
    fn run_command<F>(
        &mut self,
        req: ExecRequest,
        feeder: Option<F>,
        on_output: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus>
    where
        F: FnOnce(&mut FrameWriter<Box<dyn Transport>>, &AtomicBool) + Send,
    {
        self.send(&Message::Exec(req))?;
        match self.recv()? {
            Message::ExecStarted { .. } => {}
            Message::Error(e) => return Err(e.into()),
            other => return self.unexpected("exec-started", &other),
        }
        let done = AtomicBool::new(false);
        let reader = &mut self.reader;
        let writer = &mut self.writer;
        let result = std::thread::scope(|s| {
            let done = &done;
            let feeder = feeder.map(|f| s.spawn(move || f(writer, done)));
            let result = loop {
                match reader.read() {
                    Ok(Message::Stdout(d)) => on_output(OutputStream::Stdout, &d),
                    Ok(Message::Stderr(d)) => on_output(OutputStream::Stderr, &d),
                    Ok(Message::Exited(st)) => break Ok(st),
                    Ok(Message::Error(e)) => break Err(ClientError::Remote(e)),
                    Ok(other) => {
                        break Err(ClientError::Unexpected {
                            expected: "stdout, stderr or exited",
                            got: other.name(),
                        })
                    }
                    Err(e) => break Err(e.into()),
                }
            };
            done.store(true, Ordering::SeqCst);
            if result.is_err() {
                // Unblock the feeder if it waits on a full socket to a session that is gone.
                let _ = reader.get_ref().get_ref().shutdown();
            }
            if let Some(f) = feeder {
                let _ = f.join();
            }
            result
        });
        if matches!(
            result,
            Err(ClientError::Frame(_)) | Err(ClientError::Unexpected { .. })
        ) {
            self.broken = true;
        }
        result
    }

    /// Run a command and collect its output.
    pub fn exec_output(&mut self, req: &ExecRequest) -> Result<Output> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.exec(req, None, |s, d| match s {
            OutputStream::Stdout => stdout.extend_from_slice(d),
            OutputStream::Stderr => stderr.extend_from_slice(d),
        })?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Upload a local file.
    pub fn put_file(&mut self, local: &Path, remote: &str, opts: &PutOptions) -> Result<FileEnd> {
        let local_err = |source| ClientError::Local {
            path: local.display().to_string(),
            source,
        };
        let mut f = File::open(local).map_err(local_err)?;
        let size = f.metadata().map_err(local_err)?.len();
        self.put_reader(&mut f, remote, opts, Some(size))
    }

    /// Upload from a reader, streamed in chunks: nothing is held whole in memory. The
    /// agent writes a temporary file, checks size and SHA-256, then renames it into place.
    pub fn put_reader(
        &mut self,
        reader: &mut dyn Read,
        remote: &str,
        opts: &PutOptions,
        size: Option<u64>,
    ) -> Result<FileEnd> {
        self.send(&Message::PutFile(PutFileRequest {
            path: remote.to_string(),
            mode: opts.mode,
            owner: opts.owner.clone(),
            size,
            fsync: opts.fsync,
            create_dirs: opts.create_dirs,
        }))?;
        match self.recv()? {
            Message::Ack => {}
            Message::Error(e) => return Err(e.into()),
            other => return self.unexpected("ack", &other),
        }
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut local_error = None;
        loop {
            let sent = self
                .writer
                .send_data_with(ty::FILE_DATA, DATA_CHUNK, |buf| {
                    let n = read_retry(reader, buf).inspect_err(|e| {
                        local_error = Some(io::Error::new(e.kind(), e.to_string()))
                    })?;
                    hasher.update(&buf[..n]);
                    Ok(n)
                });
            match sent {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) => {
                    self.broken = true;
                    if let Some(le) = local_error {
                        // Dropping the connection makes the agent delete its temporary file.
                        let _ = self.writer.get_ref().shutdown();
                        return Err(ClientError::Local {
                            path: format!("upload source for {remote}"),
                            source: le,
                        });
                    }
                    // The agent may have said why before closing.
                    if let Ok(Message::Error(re)) = self.reader.read() {
                        return Err(re.into());
                    }
                    return Err(ClientError::Send(e));
                }
            }
        }
        let end = FileEnd {
            size: total,
            sha256: hasher.finalize().into(),
        };
        self.send(&Message::FileEnd(end))?;
        match self.recv()? {
            Message::PutDone(done) => {
                if done != end {
                    return Err(ClientError::Checksum {
                        path: remote.to_string(),
                        expected: hex(&end.sha256),
                        actual: hex(&done.sha256),
                    });
                }
                Ok(done)
            }
            Message::Error(e) => Err(e.into()),
            other => self.unexpected("put-done", &other),
        }
    }

    /// Download a guest file to a writer, checking size and SHA-256 at the end.
    pub fn get_to_writer(
        &mut self,
        remote: &str,
        out: &mut dyn Write,
    ) -> Result<(FileMeta, FileEnd)> {
        self.send(&Message::GetFile(remote.to_string()))?;
        let meta = match self.recv()? {
            Message::FileHeader(m) => m,
            Message::Error(e) => return Err(e.into()),
            other => return self.unexpected("file-header", &other),
        };
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut write_error = None;
        loop {
            // File data is taken straight from the frame buffer (no copy into a Message).
            let msg = match self.reader.read_raw() {
                Ok((ty::FILE_DATA, d)) => {
                    total += d.len() as u64;
                    hasher.update(d);
                    // Keep reading after a local write error so the session stays in step.
                    if write_error.is_none() {
                        if let Err(e) = out.write_all(d) {
                            write_error = Some(e);
                        }
                    }
                    continue;
                }
                Ok((t, body)) => Message::decode(t, body),
                Err(e) => Err(e),
            };
            match msg.inspect_err(|_| self.broken = true)? {
                Message::FileEnd(end) => {
                    if let Some(e) = write_error {
                        return Err(ClientError::Local {
                            path: format!("download destination for {remote}"),
                            source: e,
                        });
                    }
                    let actual: [u8; 32] = hasher.finalize().into();
                    if end.size != total {
                        return Err(ClientError::Size {
                            path: remote.to_string(),
                            expected: end.size,
                            actual: total,
                        });
                    }
                    if end.sha256 != actual {
                        return Err(ClientError::Checksum {
                            path: remote.to_string(),
                            expected: hex(&end.sha256),
                            actual: hex(&actual),
                        });
                    }
                    return Ok((meta, end));
                }
                Message::Error(e) => return Err(e.into()),
                other => return self.unexpected("file-data or file-end", &other),
            }
        }
    }

    /// Download a guest file to a local path (temporary name, renamed when verified).
    pub fn get_file(&mut self, remote: &str, local: &Path) -> Result<(FileMeta, FileEnd)> {
        let tmp = temp_sibling(local);
        let local_err = |source| ClientError::Local {
            path: local.display().to_string(),
            source,
        };
        let file = File::create(&tmp).map_err(local_err)?;
        let mut w = io::BufWriter::with_capacity(1 << 20, file);
        let r = self
            .get_to_writer(remote, &mut w)
            .and_then(|r| w.flush().map(|_| r).map_err(local_err));
        match r {
            Ok(r) => {
                drop(w);
                std::fs::rename(&tmp, local).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    local_err(e)
                })?;
                Ok(r)
            }
            Err(e) => {
                drop(w);
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Stat a guest path, following symlinks. None when it does not exist.
    pub fn stat(&mut self, path: &str) -> Result<Option<FileStat>> {
        self.stat_with(path, true)
    }

    /// Stat a guest path without following a final symlink.
    pub fn lstat(&mut self, path: &str) -> Result<Option<FileStat>> {
        self.stat_with(path, false)
    }

    fn stat_with(&mut self, path: &str, follow: bool) -> Result<Option<FileStat>> {
        self.send(&Message::Stat(StatRequest {
            path: path.to_string(),
            follow_symlinks: follow,
        }))?;
        match self.recv()? {
            Message::StatReply(s) => Ok(s),
            Message::Error(e) => Err(e.into()),
            other => self.unexpected("stat-reply", &other),
        }
    }

    /// Flush the guest's file systems.
    pub fn sync(&mut self) -> Result<()> {
        self.simple(Message::Sync)
    }

    /// Reboot the guest. Returns once the agent acknowledged; the reboot follows.
    pub fn reboot(&mut self) -> Result<()> {
        self.simple(Message::Reboot)
    }

    /// Power the guest off. Returns once the agent acknowledged; the power-off follows.
    pub fn poweroff(&mut self) -> Result<()> {
        self.simple(Message::Poweroff)
    }

    /// Power the guest off without stopping its services (init kills every process, syncs
    /// and unmounts or remounts the file systems read-only). For captures: a template needs
    /// no service to save state on the way down, and an orderly stop under TCG takes
    /// seconds per slow unit. Returns once the agent acknowledged.
    pub fn poweroff_now(&mut self) -> Result<()> {
        self.simple(Message::PoweroffNow)
    }

    /// Run a template cleanup plan in the agent itself (no process is started in the guest)
    /// and return its report of failed steps. An agent older than this request answers
    /// "unknown frame type" and closes the session: that is [`ClientError::Unsupported`],
    /// and this connection is unusable afterwards (a fallback needs a new one).
    pub fn cleanup(
        &mut self,
        plan: &crate::message::CleanupPlan,
    ) -> Result<crate::message::CleanupReport> {
        self.send(&Message::Cleanup(plan.clone()))?;
        match self.recv()? {
            Message::CleanupDone(r) => Ok(r),
            Message::Error(e) if e.kind == crate::message::ErrorKind::Protocol => {
                // Every protocol error ends the agent's session.
                self.broken = true;
                let unknown = crate::frame::FrameError::UnknownType(ty::CLEANUP).to_string();
                if e.message.contains(&unknown) {
                    Err(ClientError::Unsupported {
                        request: "cleanup",
                        reason: e.message,
                    })
                } else {
                    Err(e.into())
                }
            }
            Message::Error(e) => Err(e.into()),
            other => self.unexpected("cleanup-done", &other),
        }
    }

    /// Sync and freeze the guest's writable disk file systems (deepest mount first) and
    /// return the mount points frozen; empty when there was nothing to freeze (nothing is
    /// then held). The agent thaws by itself when no [`Client::thaw`] comes within a minute
    /// or this session ends. An agent below protocol 4 is not asked (it would end the
    /// session): that is [`ClientError::Unsupported`], and this connection stays usable.
    pub fn freeze(&mut self) -> Result<Vec<String>> {
        self.mount_points(Message::Freeze, "frozen")
    }

    /// Thaw what [`Client::freeze`] froze, in reverse; the mount points thawed. An error
    /// of kind `InvalidRequest` says nothing was frozen any more, and why (the agent thawed
    /// by itself).
    pub fn thaw(&mut self) -> Result<Vec<String>> {
        self.mount_points(Message::Thaw, "thawed")
    }

    /// Sends `freeze` or `thaw` (protocol 4) and reads the mount points of the answer.
    fn mount_points(&mut self, m: Message, answer: &'static str) -> Result<Vec<String>> {
        self.needs_protocol(4, m.name())?;
        self.send(&m)?;
        match (self.recv()?, m) {
            (Message::Frozen(points), Message::Freeze)
            | (Message::Thawed(points), Message::Thaw) => Ok(points),
            (Message::Error(e), _) => Err(e.into()),
            (other, _) => self.unexpected(answer, &other),
        }
    }

    /// [`ClientError::Unsupported`] when the session's protocol is older than `version`.
    fn needs_protocol(&self, version: u16, request: &'static str) -> Result<()> {
        if self.hello.version >= version {
            return Ok(());
        }
        Err(ClientError::Unsupported {
            request,
            reason: format!(
                "the agent (version {}) speaks protocol {}; {request} needs protocol {version}",
                self.hello.agent_version, self.hello.version
            ),
        })
    }

    /// Give the guest's NICs these addresses now (leases kiln's network has bound for them),
    /// before the guest's own DHCP client runs. An `Unavailable` error means the agent left
    /// the network to the guest (see the agent's README, "NetConfig").
    pub fn net_config(&mut self, links: Vec<crate::message::LinkConfig>) -> Result<()> {
        self.simple(Message::NetConfig(links))
    }

    fn simple(&mut self, m: Message) -> Result<()> {
        self.send(&m)?;
        match self.recv()? {
            Message::Ack => Ok(()),
            Message::Error(e) => Err(e.into()),
            other => self.unexpected("ack", &other),
        }
    }

    fn send(&mut self, m: &Message) -> Result<()> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        self.writer.send(m).map_err(|e| {
            self.broken = true;
            ClientError::Send(e)
        })
    }

    fn recv(&mut self) -> Result<Message> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        self.reader.read().map_err(|e| {
            self.broken = true;
            e.into()
        })
    }

    fn unexpected<T>(&mut self, expected: &'static str, got: &Message) -> Result<T> {
        self.broken = true;
        Err(ClientError::Unexpected {
            expected,
            got: got.name(),
        })
    }
}

/// The input side of a command on a terminal (see [`Client::exec_tty`]).
pub struct TtyInput<'a> {
    writer: &'a mut FrameWriter<Box<dyn Transport>>,
    done: &'a AtomicBool,
}

impl TtyInput<'_> {
    /// Whether the command has ended: the feeder should return.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Send keystrokes (any length: sent in frames of at most [`DATA_CHUNK`]).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(DATA_CHUNK) {
            self.writer.send_data(ty::STDIN_DATA, chunk)?;
        }
        Ok(())
    }

    /// The terminal's new size (the command gets SIGWINCH).
    pub fn resize(&mut self, size: WindowSize) -> io::Result<()> {
        self.writer.send(&Message::Resize(size))
    }

    /// Cut the connection: the agent then kills the command's whole session, and
    /// [`Client::exec_tty`] returns an error (the client is unusable afterwards).
    pub fn hang_up(&mut self) {
        let _ = self.writer.get_ref().shutdown();
    }
}

/// Stream stdin to the agent until EOF or until the command has ended.
fn feed_stdin(
    input: &mut (dyn Read + Send),
    writer: &mut FrameWriter<Box<dyn Transport>>,
    done: &AtomicBool,
) -> io::Result<()> {
    loop {
        if done.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = writer.send_data_with(ty::STDIN_DATA, DATA_CHUNK, |buf| read_retry(input, buf))?;
        if n == 0 {
            return writer.send(&Message::StdinClose);
        }
    }
}

fn read_retry(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn temp_sibling(p: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    let n = N.fetch_add(1, Ordering::Relaxed);
    p.with_file_name(format!(".{name}.kiln-tmp-{}-{n}", std::process::id()))
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8]) -> String {
    use std::fmt::Write as _;
    d.iter()
        .fold(String::with_capacity(d.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
