//! The messages of protocol version 1 and their body encoding.
//!
//! Bodies are a hand-written little-endian binary encoding: integers are fixed width,
//! strings and byte strings are a `u32` length followed by the bytes, optional values are a
//! `u8` tag (0 absent, 1 present) followed by the value, lists are a `u32` count followed by
//! the items. Every length is checked against the bytes left in the frame before anything is
//! allocated, and a body must be consumed exactly (trailing bytes are an error).

use std::time::Duration;

use crate::frame::FrameError;

/// Frame types. Requests travel host -> guest, replies guest -> host; `FileData` and
/// `FileEnd` travel both ways (upload and download).
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const EXEC: u8 = 0x02;
    pub const STDIN_DATA: u8 = 0x03;
    pub const STDIN_CLOSE: u8 = 0x04;
    pub const SIGNAL: u8 = 0x05;
    pub const PUT_FILE: u8 = 0x06;
    pub const FILE_DATA: u8 = 0x07;
    pub const FILE_END: u8 = 0x08;
    pub const GET_FILE: u8 = 0x09;
    pub const STAT: u8 = 0x0a;
    pub const SYNC: u8 = 0x0b;
    pub const REBOOT: u8 = 0x0c;
    pub const POWEROFF: u8 = 0x0d;
    pub const POWEROFF_NOW: u8 = 0x0e;
    pub const CLEANUP: u8 = 0x0f;
    pub const NET_CONFIG: u8 = 0x10;

    pub const HELLO_REPLY: u8 = 0x41;
    pub const ACK: u8 = 0x42;
    pub const EXEC_STARTED: u8 = 0x43;
    pub const STDOUT: u8 = 0x44;
    pub const STDERR: u8 = 0x45;
    pub const EXITED: u8 = 0x46;
    pub const PUT_DONE: u8 = 0x47;
    pub const FILE_HEADER: u8 = 0x48;
    pub const STAT_REPLY: u8 = 0x49;
    pub const ERROR: u8 = 0x4a;
    pub const CLEANUP_DONE: u8 = 0x4b;
}

/// Most entries an argv or env list may have.
pub const MAX_LIST: usize = 4096;

/// Longest path a cleanup action may name (Linux's PATH_MAX).
pub const MAX_CLEANUP_PATH: usize = 4096;
/// How deeply `IfExists` actions may nest (each level is a recursion in the decoder).
pub const MAX_CLEANUP_DEPTH: usize = 4;
/// Most failure lines a cleanup report carries (each is cut at 1 KiB), so a report always
/// fits in one frame.
pub const MAX_CLEANUP_FAILURES: usize = 128;

/// One step of a template cleanup, carried out by the agent itself (no process is started:
/// under an emulated CPU every program start costs a good part of a second). Every path is
/// absolute; a failing step is reported and the next one runs (best effort, like a shell
/// script under `set +e`). What to clean is kiln's policy; these are the mechanisms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupAction {
    /// Cut a regular file to zero bytes; a missing file is created empty (mode 0644), like
    /// `truncate -s 0`. A symlink or any other kind is left alone and reported.
    Truncate(String),
    /// Remove what an absolute glob names: `*` and `?` may appear in any component and also
    /// match a leading dot (like bash's `dotglob`); `[` is literal. Files and symlinks are
    /// unlinked, directories removed with their whole tree without following symlinks.
    /// Nothing matching is not an error (`rm -rf`).
    Remove(String),
    /// Truncate every non-empty regular file under a directory, recursively, without
    /// following symlinks or crossing into other file systems.
    EmptyFilesUnder(String),
    /// Write a file atomically (a temporary sibling, then rename), creating missing parent
    /// directories (0755).
    WriteFile {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// Make `link` a symlink to `target`, replacing a file or symlink already there (atomic
    /// rename), creating missing parent directories (0755).
    Symlink { target: String, link: String },
    /// Run `then` only when `path` exists (following symlinks, like `test -e`).
    IfExists {
        path: String,
        then: Vec<CleanupAction>,
    },
    /// sync(2).
    Sync,
    /// FITRIM every mounted, writable, block-device-backed file system (like `fstrim -a`);
    /// file systems that cannot discard are skipped silently.
    TrimAll,
}

impl CleanupAction {
    /// A short description for failure messages and logs.
    pub fn describe(&self) -> String {
        match self {
            CleanupAction::Truncate(p) => format!("truncate {p}"),
            CleanupAction::Remove(p) => format!("remove {p}"),
            CleanupAction::EmptyFilesUnder(p) => format!("empty files under {p}"),
            CleanupAction::WriteFile { path, .. } => format!("write {path}"),
            CleanupAction::Symlink { target, link } => format!("symlink {link} -> {target}"),
            CleanupAction::IfExists { path, .. } => format!("if exists {path}"),
            CleanupAction::Sync => "sync".into(),
            CleanupAction::TrimAll => "trim all".into(),
        }
    }
}

/// The `cleanup` request: actions run in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CleanupPlan {
    pub actions: Vec<CleanupAction>,
}

/// The answer to `cleanup`: what did not work, and what FITRIM reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CleanupReport {
    /// One line per failed step: the action, its path and the OS error. The agent keeps at
    /// most [`MAX_CLEANUP_FAILURES`] (the last line then says how many more there were).
    pub failures: Vec<String>,
    /// Bytes the file systems reported as trimmed.
    pub trimmed_bytes: u64,
    /// Wall time of the whole plan, in milliseconds.
    pub duration_ms: u64,
}

/// Most NICs one [`Message::NetConfig`] may configure, and most DNS servers or search
/// domains per NIC.
pub const MAX_NET_LINKS: usize = 16;
pub const MAX_NET_NAMES: usize = 8;

/// The address a NIC is to have, as a DHCP lease would give it: kiln binds the lease on its
/// build network and hands it to the guest before the guest's own DHCP client has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// The NIC, by MAC address.
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    /// The default route's gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
    pub dns: Vec<std::net::Ipv4Addr>,
    pub search: Vec<String>,
    /// The lease time: the address and route are dynamic, as the DHCP client's would be.
    /// [`STATIC_LEASE`] marks a static address (a NIC with an `ip` on a subnet without DHCP).
    pub lease_secs: u32,
}

/// `lease_secs` of a static address: the kernel's infinite lifetime, so the address is
/// permanent (agents that predate static addresses apply it as such too).
pub const STATIC_LEASE: u32 = u32::MAX;

impl LinkConfig {
    /// Whether this is a static address, which no DHCP client of the guest will take over.
    pub fn is_static(&self) -> bool {
        self.lease_secs == STATIC_LEASE
    }
}

/// The host's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Free text naming the client (for the agent's log).
    pub client: String,
}

/// Facts about the guest, sent in the hello reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// `uname -m`.
    pub arch: String,
    /// The node name (`uname -n`).
    pub hostname: String,
    /// `ID` from /etc/os-release (e.g. `debian`), empty when unknown.
    pub distro_id: String,
    /// `VERSION_ID` from /etc/os-release, empty when unknown.
    pub distro_version: String,
    /// `PRETTY_NAME` from /etc/os-release, empty when unknown.
    pub distro_pretty: String,
    /// The name of PID 1 (`systemd`, `init`, `kiln-agent`...), from /proc/1/comm.
    pub init: String,
}

/// The agent's answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The protocol version both sides will speak.
    pub version: u16,
    /// The agent's crate version.
    pub agent_version: String,
    pub guest: GuestInfo,
    /// True when the guest is ready for provisioning (see the agent's `--ready-when`).
    pub ready: bool,
    /// Why the guest is or is not ready, in words.
    pub readiness: String,
    /// Seconds since the guest booted (from /proc/uptime), in milliseconds.
    pub uptime_ms: u64,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), new on every boot; sent
    /// from protocol version 2 on, empty before.
    pub boot_id: String,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A program and its arguments; the program is looked up in `PATH`.
    Argv(Vec<String>),
    /// A script body run by an interpreter (written to a private file in the guest).
    Script {
        interpreter: Interpreter,
        body: String,
    },
}

/// Script interpreters the agent knows how to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpreter {
    Bash,
    Sh,
    /// `pwsh -NoProfile -NonInteractive -File`, named now for Windows guests later.
    PowerShell,
}

impl Interpreter {
    fn code(self) -> u8 {
        match self {
            Interpreter::Bash => 0,
            Interpreter::Sh => 1,
            Interpreter::PowerShell => 2,
        }
    }
}

/// An exec request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: Command,
    /// Added to (and overriding) the agent's clean base environment (PATH, HOME, USER,
    /// LOGNAME, SHELL): the agent's own environment is never passed on.
    pub env: Vec<(String, String)>,
    /// Working directory; default: the user's home, else `/`.
    pub cwd: Option<String>,
    /// A user name or numeric uid from the guest's /etc/passwd; default: the agent's user.
    pub user: Option<String>,
    /// Kill the whole process group after this long.
    pub timeout: Option<Duration>,
    /// When false the command's stdin is /dev/null; when true the client streams it.
    pub stdin: bool,
    /// Send stderr down the stdout pipe (like `2>&1`): one stream, exact order.
    pub merge_stderr: bool,
}

impl ExecRequest {
    /// Run `argv` with everything else defaulted.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            command: Command::Argv(argv.into_iter().map(Into::into).collect()),
            env: Vec::new(),
            cwd: None,
            user: None,
            timeout: None,
            stdin: false,
            merge_stderr: false,
        }
    }

    /// Run a script body with an interpreter.
    pub fn script(interpreter: Interpreter, body: impl Into<String>) -> Self {
        ExecRequest {
            command: Command::Script {
                interpreter,
                body: body.into(),
            },
            ..ExecRequest::argv(Vec::<String>::new())
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn merge_stderr(mut self, merge: bool) -> Self {
        self.merge_stderr = merge;
        self
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// True when the agent killed it because its timeout passed.
    pub timed_out: bool,
    /// Wall time from start to exit, in milliseconds.
    pub duration_ms: u64,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            _ if self.timed_out => write!(f, "killed after its timeout"),
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

/// Upload a file. The agent answers `Ack` when it is ready for the data (or `Error`); the
/// host then sends `FileData`* and `FileEnd`, and the agent answers `PutDone` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutFileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// `user`, `user:group`, `:group`, names or numbers, resolved in the guest's
    /// /etc/passwd and /etc/group. None: the agent's user.
    pub owner: Option<String>,
    /// The expected size, when known: checked at the end.
    pub size: Option<u64>,
    /// fsync the file and its directory before answering.
    pub fsync: bool,
    /// Create missing parent directories (mode 0755).
    pub create_dirs: bool,
}

/// End of a file stream: total size and SHA-256 of the bytes sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileEnd {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Metadata sent before a downloaded file's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

/// Stat a guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRequest {
    pub path: String,
    pub follow_symlinks: bool,
}

/// The kind of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The answer to `Stat` when the path exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// The link target, for a symlink that was not followed.
    pub link_target: Option<String>,
}

/// Categories of errors the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The peer broke the protocol; the agent closes the session after sending this.
    Protocol,
    /// The request was well-formed but not acceptable (relative path, empty argv...).
    InvalidRequest,
    NotFound,
    PermissionDenied,
    /// Any other I/O error (errno is set).
    Io,
    /// The uploaded data does not match the checksum or size the host sent.
    Checksum,
    /// The user or group does not exist in the guest.
    UnknownUser,
    /// The command could not be started.
    Spawn,
    /// Too many sessions, or power actions disabled.
    Unavailable,
    /// A kind this version does not know.
    Other,
}

impl ErrorKind {
    fn code(self) -> u16 {
        match self {
            ErrorKind::Protocol => 1,
            ErrorKind::InvalidRequest => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::PermissionDenied => 4,
            ErrorKind::Io => 5,
            ErrorKind::Checksum => 6,
            ErrorKind::UnknownUser => 7,
            ErrorKind::Spawn => 8,
            ErrorKind::Unavailable => 9,
            ErrorKind::Other => 0,
        }
    }

    fn from_code(c: u16) -> Self {
        match c {
            1 => ErrorKind::Protocol,
            2 => ErrorKind::InvalidRequest,
            3 => ErrorKind::NotFound,
            4 => ErrorKind::PermissionDenied,
            5 => ErrorKind::Io,
            6 => ErrorKind::Checksum,
            7 => ErrorKind::UnknownUser,
            8 => ErrorKind::Spawn,
            9 => ErrorKind::Unavailable,
            _ => ErrorKind::Other,
        }
    }
}

/// An error reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({kind:?}{})", if *.errno != 0 { format!(", errno {}", .errno) } else { String::new() })]
pub struct RemoteError {
    pub kind: ErrorKind,
    /// The OS error number behind it, or 0.
    pub errno: i32,
    pub message: String,
}

impl RemoteError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            errno: 0,
            message: message.into(),
        }
    }

    /// Classify an I/O error, prefixing `context` to its message.
    pub fn from_io(context: &str, e: &std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        };
        RemoteError {
            kind,
            errno: e.raw_os_error().unwrap_or(0),
            message: format!("{context}: {e}"),
        }
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Exec(ExecRequest),
    StdinData(Vec<u8>),
    StdinClose,
    Signal(i32),
    PutFile(PutFileRequest),
    FileData(Vec<u8>),
    FileEnd(FileEnd),
    GetFile(String),
    Stat(StatRequest),
    Sync,
    Reboot,
    Poweroff,
    /// Power off without stopping services (for a capture, after the template cleanup):
    /// processes are killed, file systems synced and unmounted or remounted read-only.
    PoweroffNow,
    /// Run a template cleanup plan in the agent itself; answered by `CleanupDone`.
    Cleanup(CleanupPlan),
    /// Configure the guest's NICs now (answered with `Ack`, or an `Error` when the agent
    /// leaves the network to the guest's own DHCP client).
    NetConfig(Vec<LinkConfig>),

    HelloReply(HelloReply),
    Ack,
    ExecStarted {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
    PutDone(FileEnd),
    FileHeader(FileMeta),
    StatReply(Option<FileStat>),
    Error(RemoteError),
    CleanupDone(CleanupReport),
}

impl Message {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.frame_type())
    }

    pub fn frame_type(&self) -> u8 {
        match self {
            Message::Hello(_) => ty::HELLO,
            Message::Exec(_) => ty::EXEC,
            Message::StdinData(_) => ty::STDIN_DATA,
            Message::StdinClose => ty::STDIN_CLOSE,
            Message::Signal(_) => ty::SIGNAL,
            Message::PutFile(_) => ty::PUT_FILE,
            Message::FileData(_) => ty::FILE_DATA,
            Message::FileEnd(_) => ty::FILE_END,
            Message::GetFile(_) => ty::GET_FILE,
            Message::Stat(_) => ty::STAT,
            Message::Sync => ty::SYNC,
            Message::Reboot => ty::REBOOT,
            Message::Poweroff => ty::POWEROFF,
            Message::PoweroffNow => ty::POWEROFF_NOW,
            Message::NetConfig(_) => ty::NET_CONFIG,
            Message::HelloReply(_) => ty::HELLO_REPLY,
            Message::Ack => ty::ACK,
            Message::ExecStarted { .. } => ty::EXEC_STARTED,
            Message::Stdout(_) => ty::STDOUT,
            Message::Stderr(_) => ty::STDERR,
            Message::Exited(_) => ty::EXITED,
            Message::PutDone(_) => ty::PUT_DONE,
            Message::FileHeader(_) => ty::FILE_HEADER,
            Message::StatReply(_) => ty::STAT_REPLY,
            Message::Error(_) => ty::ERROR,
            Message::Cleanup(_) => ty::CLEANUP,
            Message::CleanupDone(_) => ty::CLEANUP_DONE,
        }
    }

    /// Append the body to `out`; returns the frame type.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> u8 {
        let mut e = Enc(out);
        match self {
            Message::Hello(h) => {
                e.u16(h.min_version);
                e.u16(h.max_version);
                e.str(&h.client);
            }
            Message::Exec(x) => {
                match &x.command {
                    Command::Argv(argv) => {
                        e.u8(0);
                        e.list(argv.iter(), |e, s| e.str(s));
                    }
                    Command::Script { interpreter, body } => {
                        e.u8(1);
                        e.u8(interpreter.code());
                        e.str(body);
                    }
                }
                e.list(x.env.iter(), |e, (k, v)| {
                    e.str(k);
                    e.str(v);
                });
                e.opt(x.cwd.as_deref(), |e, s| e.str(s));
                e.opt(x.user.as_deref(), |e, s| e.str(s));
                e.u64(x.timeout.map_or(0, |t| (t.as_millis() as u64).max(1)));
                e.bool(x.stdin);
                e.bool(x.merge_stderr);
            }
            Message::StdinData(d)
            | Message::FileData(d)
            | Message::Stdout(d)
            | Message::Stderr(d) => e.0.extend_from_slice(d),
            Message::StdinClose
            | Message::Sync
            | Message::Reboot
            | Message::Poweroff
            | Message::PoweroffNow
            | Message::Ack => {}
            Message::Signal(s) => e.i32(*s),
            Message::PutFile(p) => {
                e.str(&p.path);
                e.u32(p.mode);
                e.opt(p.owner.as_deref(), |e, s| e.str(s));
                e.opt(p.size, |e, s| e.u64(s));
                e.bool(p.fsync);
                e.bool(p.create_dirs);
            }
            Message::FileEnd(f) | Message::PutDone(f) => {
                e.u64(f.size);
                e.0.extend_from_slice(&f.sha256);
            }
            Message::GetFile(p) => e.str(p),
            Message::NetConfig(links) => e.list(links.iter(), |e, l| {
                e.0.extend_from_slice(&l.mac);
                e.0.extend_from_slice(&l.address.octets());
                e.u8(l.prefix);
                e.opt(l.gateway, |e, g| e.0.extend_from_slice(&g.octets()));
                e.list(l.dns.iter(), |e, a| e.0.extend_from_slice(&a.octets()));
                e.list(l.search.iter(), |e, s| e.str(s));
                e.u32(l.lease_secs);
            }),
            Message::Stat(s) => {
                e.str(&s.path);
                e.bool(s.follow_symlinks);
            }
            Message::HelloReply(r) => {
                e.u16(r.version);
                e.str(&r.agent_version);
                let g = &r.guest;
                for s in [
                    &g.kernel_release,
                    &g.kernel_version,
                    &g.arch,
                    &g.hostname,
                    &g.distro_id,
                    &g.distro_version,
                    &g.distro_pretty,
                    &g.init,
                ] {
                    e.str(s);
                }
                e.bool(r.ready);
                e.str(&r.readiness);
                e.u64(r.uptime_ms);
                if r.version >= 2 {
                    e.str(&r.boot_id);
                }
            }
            Message::ExecStarted { pid } => e.u32(*pid),
            Message::Exited(x) => {
                e.opt(x.code, |e, c| e.i32(c));
                e.opt(x.signal, |e, s| e.i32(s));
                e.bool(x.timed_out);
                e.u64(x.duration_ms);
            }
            Message::FileHeader(m) => {
                e.u64(m.size);
                e.u32(m.mode);
                e.u32(m.uid);
                e.u32(m.gid);
                e.i64(m.mtime);
            }
            Message::StatReply(s) => e.opt(s.as_ref(), |e, s| {
                e.u8(match s.kind {
                    FileKind::File => 0,
                    FileKind::Dir => 1,
                    FileKind::Symlink => 2,
                    FileKind::Other => 3,
                });
                e.u64(s.size);
                e.u32(s.mode);
                e.u32(s.uid);
                e.u32(s.gid);
                e.i64(s.mtime);
                e.opt(s.link_target.as_deref(), |e, t| e.str(t));
            }),
            Message::Error(r) => {
                e.u16(r.kind.code());
                e.i32(r.errno);
                e.str(&r.message);
            }
            Message::Cleanup(p) => encode_cleanup_actions(&mut e, &p.actions),
            Message::CleanupDone(r) => {
                e.list(r.failures.iter(), |e, s| e.str(s));
                e.u64(r.trimmed_bytes);
                e.u64(r.duration_ms);
            }
        }
        self.frame_type()
    }

    /// Decode a frame body of type `t`.
    pub fn decode(t: u8, body: &[u8]) -> Result<Message, FrameError> {
        let kind = type_name(t);
        if kind == "unknown" {
            return Err(FrameError::UnknownType(t));
        }
        let mut d = Dec { buf: body, kind };
        let msg = match t {
            ty::HELLO => Message::Hello(Hello {
                min_version: d.u16()?,
                max_version: d.u16()?,
                client: d.str()?,
            }),
            ty::EXEC => {
                let command = match d.u8()? {
                    0 => {
                        let argv = d.list(|d| d.str())?;
                        Command::Argv(argv)
                    }
                    1 => {
                        let interpreter = match d.u8()? {
                            0 => Interpreter::Bash,
                            1 => Interpreter::Sh,
                            2 => Interpreter::PowerShell,
                            n => return Err(d.bad(format!("unknown interpreter {n}"))),
                        };
                        Command::Script {
                            interpreter,
                            body: d.str()?,
                        }
                    }
                    n => return Err(d.bad(format!("unknown command kind {n}"))),
                };
                let env = d.list(|d| Ok((d.str()?, d.str()?)))?;
                let cwd = d.opt(|d| d.str())?;
                let user = d.opt(|d| d.str())?;
                let timeout = match d.u64()? {
                    0 => None,
                    ms => Some(Duration::from_millis(ms)),
                };
                Message::Exec(ExecRequest {
                    command,
                    env,
                    cwd,
                    user,
                    timeout,
                    stdin: d.bool()?,
                    merge_stderr: d.bool()?,
                })
            }
            ty::STDIN_DATA => Message::StdinData(d.rest()),
            ty::FILE_DATA => Message::FileData(d.rest()),
            ty::STDOUT => Message::Stdout(d.rest()),
            ty::STDERR => Message::Stderr(d.rest()),
            ty::STDIN_CLOSE => Message::StdinClose,
            ty::SYNC => Message::Sync,
            ty::REBOOT => Message::Reboot,
            ty::POWEROFF => Message::Poweroff,
            ty::POWEROFF_NOW => Message::PoweroffNow,
            ty::ACK => Message::Ack,
            ty::SIGNAL => Message::Signal(d.i32()?),
            ty::PUT_FILE => Message::PutFile(PutFileRequest {
                path: d.str()?,
                mode: d.u32()?,
                owner: d.opt(|d| d.str())?,
                size: d.opt(|d| d.u64())?,
                fsync: d.bool()?,
                create_dirs: d.bool()?,
            }),
            ty::FILE_END | ty::PUT_DONE => {
                let f = FileEnd {
                    size: d.u64()?,
                    sha256: d.array32()?,
                };
                if t == ty::FILE_END {
                    Message::FileEnd(f)
                } else {
                    Message::PutDone(f)
                }
            }
            ty::GET_FILE => Message::GetFile(d.str()?),
            ty::NET_CONFIG => {
                let links = d.list(|d| {
                    let mac = d.fixed::<6>("MAC address")?;
                    let address = d.fixed::<4>("IPv4 address")?.into();
                    let prefix = d.u8()?;
                    if prefix > 32 {
                        return Err(d.bad(format!("prefix length {prefix} is over 32")));
                    }
                    let gateway = d.opt(|d| Ok(d.fixed::<4>("IPv4 gateway")?.into()))?;
                    let dns = d.list(|d| Ok(d.fixed::<4>("IPv4 DNS server")?.into()))?;
                    let search = d.list(|d| d.str())?;
                    if dns.len() > MAX_NET_NAMES || search.len() > MAX_NET_NAMES {
                        return Err(d.bad(format!(
                            "more than {MAX_NET_NAMES} DNS servers or search domains"
                        )));
                    }
                    Ok(LinkConfig {
                        mac,
                        address,
                        prefix,
                        gateway,
                        dns,
                        search,
                        lease_secs: d.u32()?,
                    })
                })?;
                if links.len() > MAX_NET_LINKS {
                    return Err(d.bad(format!("more than {MAX_NET_LINKS} NICs")));
                }
                Message::NetConfig(links)
            }
            ty::STAT => Message::Stat(StatRequest {
                path: d.str()?,
                follow_symlinks: d.bool()?,
            }),
            ty::HELLO_REPLY => {
                let version = d.u16()?;
                let agent_version = d.str()?;
                let guest = GuestInfo {
                    kernel_release: d.str()?,
                    kernel_version: d.str()?,
                    arch: d.str()?,
                    hostname: d.str()?,
                    distro_id: d.str()?,
                    distro_version: d.str()?,
                    distro_pretty: d.str()?,
                    init: d.str()?,
                };
                Message::HelloReply(HelloReply {
                    version,
                    agent_version,
                    guest,
                    ready: d.bool()?,
                    readiness: d.str()?,
                    uptime_ms: d.u64()?,
                    boot_id: if version >= 2 {
                        d.str()?
                    } else {
                        String::new()
                    },
                })
            }
            ty::EXEC_STARTED => Message::ExecStarted { pid: d.u32()? },
            ty::EXITED => Message::Exited(ExitStatus {
                code: d.opt(|d| d.i32())?,
                signal: d.opt(|d| d.i32())?,
                timed_out: d.bool()?,
                duration_ms: d.u64()?,
            }),
            ty::FILE_HEADER => Message::FileHeader(FileMeta {
                size: d.u64()?,
                mode: d.u32()?,
                uid: d.u32()?,
                gid: d.u32()?,
                mtime: d.i64()?,
            }),
            ty::STAT_REPLY => Message::StatReply(d.opt(|d| {
                let kind = match d.u8()? {
                    0 => FileKind::File,
                    1 => FileKind::Dir,
                    2 => FileKind::Symlink,
                    3 => FileKind::Other,
                    n => return Err(d.bad(format!("unknown file kind {n}"))),
                };
                Ok(FileStat {
                    kind,
                    size: d.u64()?,
                    mode: d.u32()?,
                    uid: d.u32()?,
                    gid: d.u32()?,
                    mtime: d.i64()?,
                    link_target: d.opt(|d| d.str())?,
                })
            })?),
            ty::ERROR => Message::Error(RemoteError {
                kind: ErrorKind::from_code(d.u16()?),
                errno: d.i32()?,
                message: d.str()?,
            }),
            ty::CLEANUP => Message::Cleanup(CleanupPlan {
                actions: decode_cleanup_actions(&mut d, 1)?,
            }),
            ty::CLEANUP_DONE => Message::CleanupDone(CleanupReport {
                failures: d.list(|d| d.str())?,
                trimmed_bytes: d.u64()?,
                duration_ms: d.u64()?,
            }),
            other => return Err(FrameError::UnknownType(other)),
        };
        if !d.buf.is_empty() {
            return Err(d.bad(format!("{} trailing bytes", d.buf.len())));
        }
        Ok(msg)
    }
}

/// The name of a frame type, or "unknown".
pub fn type_name(t: u8) -> &'static str {
    match t {
        ty::HELLO => "hello",
        ty::EXEC => "exec",
        ty::STDIN_DATA => "stdin-data",
        ty::STDIN_CLOSE => "stdin-close",
        ty::SIGNAL => "signal",
        ty::PUT_FILE => "put-file",
        ty::FILE_DATA => "file-data",
        ty::FILE_END => "file-end",
        ty::GET_FILE => "get-file",
        ty::STAT => "stat",
        ty::SYNC => "sync",
        ty::REBOOT => "reboot",
        ty::POWEROFF => "poweroff",
        ty::POWEROFF_NOW => "poweroff-now",
        ty::NET_CONFIG => "net-config",
        ty::HELLO_REPLY => "hello-reply",
        ty::ACK => "ack",
        ty::EXEC_STARTED => "exec-started",
        ty::STDOUT => "stdout",
        ty::STDERR => "stderr",
        ty::EXITED => "exited",
        ty::PUT_DONE => "put-done",
        ty::FILE_HEADER => "file-header",
        ty::STAT_REPLY => "stat-reply",
        ty::ERROR => "error",
        ty::CLEANUP => "cleanup",
        ty::CLEANUP_DONE => "cleanup-done",
        _ => "unknown",
    }
}

fn encode_cleanup_actions(e: &mut Enc<'_>, actions: &[CleanupAction]) {
    e.list(actions.iter(), |e, a| match a {
        CleanupAction::Truncate(p) => {
            e.u8(0);
            e.str(p);
        }
        CleanupAction::Remove(p) => {
            e.u8(1);
            e.str(p);
        }
        CleanupAction::EmptyFilesUnder(p) => {
            e.u8(2);
            e.str(p);
        }
        CleanupAction::WriteFile { path, mode, data } => {
            e.u8(3);
            e.str(path);
            e.u32(*mode);
            e.bytes(data);
        }
        CleanupAction::Symlink { target, link } => {
            e.u8(4);
            e.str(target);
            e.str(link);
        }
        CleanupAction::IfExists { path, then } => {
            e.u8(5);
            e.str(path);
            encode_cleanup_actions(e, then);
        }
        CleanupAction::Sync => e.u8(6),
        CleanupAction::TrimAll => e.u8(7),
    })
}

/// Decode a list of cleanup actions at nesting level `depth` (the plan itself is level 1).
fn decode_cleanup_actions(d: &mut Dec<'_>, depth: usize) -> Result<Vec<CleanupAction>, FrameError> {
    if depth > MAX_CLEANUP_DEPTH {
        return Err(d.bad(format!(
            "if-exists actions nest deeper than {MAX_CLEANUP_DEPTH} levels"
        )));
    }
    d.list(|d| {
        Ok(match d.u8()? {
            0 => CleanupAction::Truncate(d.path()?),
            1 => CleanupAction::Remove(d.path()?),
            2 => CleanupAction::EmptyFilesUnder(d.path()?),
            3 => {
                let path = d.path()?;
                let mode = d.u32()?;
                if mode & !0o7777 != 0 {
                    return Err(d.bad(format!(
                        "write-file mode {mode:#o} for {path} has bits beyond 0o7777"
                    )));
                }
                CleanupAction::WriteFile {
                    path,
                    mode,
                    data: d.bytes()?,
                }
            }
            4 => CleanupAction::Symlink {
                target: d.path()?,
                link: d.path()?,
            },
            5 => CleanupAction::IfExists {
                path: d.path()?,
                then: decode_cleanup_actions(d, depth + 1)?,
            },
            6 => CleanupAction::Sync,
            7 => CleanupAction::TrimAll,
            n => return Err(d.bad(format!("unknown cleanup action {n}"))),
        })
    })
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.push(v as u8);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v)
            }
        }
    }
    fn list<I: ExactSizeIterator>(&mut self, items: I, mut f: impl FnMut(&mut Self, I::Item)) {
        self.u32(items.len() as u32);
        for i in items {
            f(self, i)
        }
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Dec<'a> {
    fn bad(&self, reason: String) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            reason,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.bad(format!(
                "{what} needs {n} bytes but only {} remain",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.fixed::<1>("u8")?[0])
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(self.bad(format!("boolean byte {n} is neither 0 nor 1"))),
        }
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.fixed("u16")?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.fixed("u32")?))
    }
    fn i32(&mut self) -> Result<i32, FrameError> {
        Ok(i32::from_le_bytes(self.fixed("i32")?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.fixed("u64")?))
    }
    fn i64(&mut self) -> Result<i64, FrameError> {
        Ok(i64::from_le_bytes(self.fixed("i64")?))
    }
    fn array32(&mut self) -> Result<[u8; 32], FrameError> {
        self.fixed("sha256")
    }
    fn str(&mut self) -> Result<String, FrameError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len, "string")?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.bad(format!("string is not UTF-8: {e}")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, FrameError> {
        let len = self.u32()? as usize;
        Ok(self.take(len, "byte string")?.to_vec())
    }
    /// A cleanup path: a string of at most [`MAX_CLEANUP_PATH`] bytes without NUL.
    fn path(&mut self) -> Result<String, FrameError> {
        let s = self.str()?;
        if s.len() > MAX_CLEANUP_PATH {
            return Err(self.bad(format!(
                "a path of {} bytes exceeds the limit of {MAX_CLEANUP_PATH}",
                s.len()
            )));
        }
        if s.contains('\0') {
            return Err(self.bad(format!("path {s:?} contains a NUL byte")));
        }
        Ok(s)
    }
    fn rest(&mut self) -> Vec<u8> {
        let v = self.buf.to_vec();
        self.buf = &[];
        v
    }
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(f(self)?)),
            n => Err(self.bad(format!("option tag {n} is neither 0 nor 1"))),
        }
    }
    fn list<T>(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<T, FrameError>,
    ) -> Result<Vec<T>, FrameError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST {
            return Err(self.bad(format!("list of {n} items exceeds the limit of {MAX_LIST}")));
        }
        // Every item takes at least 4 bytes, so the remaining body bounds the allocation.
        let mut v = Vec::with_capacity(n.min(self.buf.len() / 4));
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleanup_plan_sample() -> CleanupPlan {
        CleanupPlan {
            actions: vec![
                CleanupAction::Truncate("/etc/machine-id".into()),
                CleanupAction::Remove("/tmp/kiln-*".into()),
                CleanupAction::EmptyFilesUnder("/var/log".into()),
                CleanupAction::IfExists {
                    path: "/etc/ssh".into(),
                    then: vec![
                        CleanupAction::WriteFile {
                            path: "/etc/x.service".into(),
                            mode: 0o644,
                            data: vec![0, 1, 255],
                        },
                        CleanupAction::Symlink {
                            target: "/etc/x.service".into(),
                            link: "/etc/wants/x.service".into(),
                        },
                        CleanupAction::IfExists {
                            path: "/a".into(),
                            then: vec![],
                        },
                    ],
                },
                CleanupAction::Sync,
                CleanupAction::TrimAll,
            ],
        }
    }

    #[test]
    fn cleanup_messages_roundtrip() {
        roundtrip(Message::Cleanup(cleanup_plan_sample()));
        roundtrip(Message::Cleanup(CleanupPlan::default()));
        roundtrip(Message::CleanupDone(CleanupReport {
            failures: vec!["remove /x: Permission denied (os error 13)".into()],
            trimmed_bytes: 1 << 33,
            duration_ms: 12,
        }));
        assert_eq!(type_name(ty::CLEANUP), "cleanup");
        assert_eq!(type_name(ty::CLEANUP_DONE), "cleanup-done");
    }

    #[test]
    fn cleanup_decoding_rejects_absurd_input() {
        let enc = |m: Message| {
            let mut b = Vec::new();
            let t = m.encode_body(&mut b);
            (t, b)
        };
        let err_of = |m: Message| {
            let (t, b) = enc(m);
            Message::decode(t, &b).unwrap_err().to_string()
        };
        // Nesting deeper than the limit (the decoder recurses once per level).
        let mut deep = vec![CleanupAction::Sync];
        for _ in 0..MAX_CLEANUP_DEPTH {
            deep = vec![CleanupAction::IfExists {
                path: "/".into(),
                then: deep,
            }];
        }
        let err = err_of(Message::Cleanup(CleanupPlan { actions: deep }));
        assert!(err.contains("nest deeper"), "{err}");
        // One level less is fine.
        let mut ok = vec![CleanupAction::Sync];
        for _ in 1..MAX_CLEANUP_DEPTH {
            ok = vec![CleanupAction::IfExists {
                path: "/".into(),
                then: ok,
            }];
        }
        roundtrip(Message::Cleanup(CleanupPlan { actions: ok }));
        // A path over PATH_MAX, a NUL in a path, a mode with type bits.
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::Remove("/".repeat(MAX_CLEANUP_PATH + 1))],
        }));
        assert!(err.contains("exceeds the limit of 4096"), "{err}");
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::Truncate("/a\0b".into())],
        }));
        assert!(err.contains("NUL"), "{err}");
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::WriteFile {
                path: "/f".into(),
                mode: 0o100644,
                data: vec![],
            }],
        }));
        assert!(err.contains("beyond 0o7777"), "{err}");
        // An unknown action tag.
        let err = Message::decode(ty::CLEANUP, &[1, 0, 0, 0, 9])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown cleanup action 9"), "{err}");
        // Counts: over the list cap, and a plausible count with nothing behind it.
        let err = Message::decode(ty::CLEANUP, &[0xff, 0xff, 0xff, 0xff])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
        let err = Message::decode(ty::CLEANUP, &[0x00, 0x10, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("remain"), "{err}");
        // A write-file whose data length claims 4 GiB.
        let mut body = vec![1, 0, 0, 0, 3, 2, 0, 0, 0, b'/', b'f'];
        body.extend_from_slice(&0o644u32.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Message::decode(ty::CLEANUP, &body).unwrap_err().to_string();
        assert!(err.contains("byte string needs 4294967295 bytes"), "{err}");
        // A report with more failure lines than any list may have.
        let err = Message::decode(ty::CLEANUP_DONE, &[0xff, 0xff, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    fn roundtrip(m: Message) {
        let mut body = Vec::new();
        let t = m.encode_body(&mut body);
        let back = Message::decode(t, &body).expect("decode");
        assert_eq!(back, m);
        // Every strict prefix of a non-empty fixed-shape body must fail, never panic.
        for cut in 0..body.len() {
            let _ = Message::decode(t, &body[..cut]);
        }
    }

    #[test]
    fn every_message_roundtrips() {
        let stat = FileStat {
            kind: FileKind::Symlink,
            size: 12,
            mode: 0o777,
            uid: 1,
            gid: 2,
            mtime: -5,
            link_target: Some("target".into()),
        };
        for m in [
            Message::Hello(Hello {
                min_version: 1,
                max_version: 3,
                client: "test".into(),
            }),
            Message::Exec(
                ExecRequest::argv(["a", "b"])
                    .env("K", "V")
                    .cwd("/tmp")
                    .user("nobody")
                    .timeout(Duration::from_millis(1500)),
            ),
            Message::Exec(ExecRequest::script(
                Interpreter::PowerShell,
                "Write-Host hi",
            )),
            Message::StdinData(vec![0, 1, 2, 255]),
            Message::StdinClose,
            Message::Signal(15),
            Message::PutFile(PutFileRequest {
                path: "/etc/x".into(),
                mode: 0o600,
                owner: Some("root:adm".into()),
                size: Some(1 << 40),
                fsync: true,
                create_dirs: false,
            }),
            Message::FileData(vec![7; 1000]),
            Message::FileEnd(FileEnd {
                size: 9,
                sha256: [3; 32],
            }),
            Message::GetFile("/etc/hostname".into()),
            Message::Stat(StatRequest {
                path: "/".into(),
                follow_symlinks: true,
            }),
            Message::Sync,
            Message::Reboot,
            Message::Poweroff,
            Message::PoweroffNow,
            Message::NetConfig(vec![
                LinkConfig {
                    mac: [2, 0, 0, 0, 0, 1],
                    address: [10, 0, 2, 15].into(),
                    prefix: 24,
                    gateway: Some([10, 0, 2, 1].into()),
                    dns: vec![[10, 0, 2, 1].into()],
                    search: vec!["lab".into()],
                    lease_secs: 3600,
                },
                LinkConfig {
                    mac: [2, 0, 0, 0, 0, 2],
                    address: [192, 168, 9, 3].into(),
                    prefix: 30,
                    gateway: None,
                    dns: vec![],
                    search: vec![],
                    lease_secs: 0,
                },
            ]),
            Message::HelloReply(HelloReply {
                version: 1,
                agent_version: "0.1.0".into(),
                guest: GuestInfo {
                    hostname: "h".into(),
                    ..Default::default()
                },
                ready: true,
                readiness: "ready".into(),
                uptime_ms: 77,
                boot_id: String::new(),
            }),
            Message::HelloReply(HelloReply {
                version: 2,
                agent_version: "0.2.0".into(),
                guest: GuestInfo::default(),
                ready: false,
                readiness: "waiting".into(),
                uptime_ms: 78,
                boot_id: "5c1b1c3e-7f27-4f25-9d0e-1f0f6b2a9c11".into(),
            }),
            Message::Ack,
            Message::ExecStarted { pid: 42 },
            Message::Stdout(b"out".to_vec()),
            Message::Stderr(vec![]),
            Message::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ms: 5,
            }),
            Message::PutDone(FileEnd {
                size: 1,
                sha256: [0; 32],
            }),
            Message::FileHeader(FileMeta {
                size: 1,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 1,
            }),
            Message::StatReply(Some(stat)),
            Message::StatReply(None),
            Message::Error(RemoteError::new(ErrorKind::Checksum, "bad")),
        ] {
            roundtrip(m);
        }
    }

    #[test]
    fn rejects_trailing_bytes_and_bad_tags() {
        assert!(matches!(
            Message::decode(ty::SYNC, &[0]),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(ty::STAT, &[0, 0, 0, 0, 2]),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(0x7f, &[]),
            Err(FrameError::UnknownType(0x7f))
        ));
    }

    #[test]
    fn net_config_bounds_are_checked() {
        let link = LinkConfig {
            mac: [2, 0, 0, 0, 0, 1],
            address: [10, 0, 2, 15].into(),
            prefix: 24,
            gateway: None,
            dns: vec![],
            search: vec![],
            lease_secs: 60,
        };
        let enc = |m: Message| {
            let mut b = Vec::new();
            let t = m.encode_body(&mut b);
            (t, b)
        };
        let (t, mut body) = enc(Message::NetConfig(vec![link.clone()]));
        // The prefix byte follows the count (4), the MAC (6) and the address (4).
        body[14] = 33;
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("prefix length 33"), "{err}");
        let (t, body) = enc(Message::NetConfig(vec![link.clone(); MAX_NET_LINKS + 1]));
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("NICs"), "{err}");
        let many = LinkConfig {
            search: vec!["a".into(); MAX_NET_NAMES + 1],
            ..link
        };
        let (t, body) = enc(Message::NetConfig(vec![many]));
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("search domains"), "{err}");
    }

    #[test]
    fn huge_list_counts_are_refused_before_allocating() {
        // exec, argv kind, count u32::MAX
        let body = [0u8, 0xff, 0xff, 0xff, 0xff];
        let err = Message::decode(ty::EXEC, &body).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // a string claiming 4 GiB
        let body = [0xffu8, 0xff, 0xff, 0xff];
        let err = Message::decode(ty::GET_FILE, &body).unwrap_err();
        assert!(err.to_string().contains("only 0 remain"), "{err}");
    }
}
