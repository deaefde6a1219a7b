//! The messages of protocol version 1: frame types, limits and the message types.
//!
//! Their body encoding lives beside them: `codec` encodes and decodes every message's body,
//! and `cleanup` the template cleanup's plan and report, whose nested actions are the one
//! recursive shape on the wire.

mod cleanup;
mod codec;

use std::time::Duration;

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
    /// A terminal's new window size (protocol 3), while a command runs on a terminal.
    pub const RESIZE: u8 = 0x11;
    /// Sync and freeze the guest's writable block-device file systems (protocol 4).
    pub const FREEZE: u8 = 0x12;
    /// Thaw what `freeze` froze (protocol 4).
    pub const THAW: u8 = 0x13;

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
    pub const FROZEN: u8 = 0x4c;
    pub const THAWED: u8 = 0x4d;
}

/// Most entries an argv or env list may have.
pub const MAX_LIST: usize = 4096;

/// Longest `TERM` a terminal request may name.
pub const MAX_TERM: usize = 64;

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
    /// Run on a terminal (protocol 3): a pty whose output is one `stdout` stream, whose
    /// input is `stdin-data`, resized by `resize`. An empty argv then runs the user's
    /// login shell. `stdin` and `merge_stderr` are implied.
    pub tty: Option<Tty>,
}

/// The terminal an [`ExecRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tty {
    /// `TERM` for the command; empty: `xterm-256color`.
    pub term: String,
    pub size: WindowSize,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
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
            tty: None,
        }
    }

    /// The user's login shell on a terminal of `size`.
    pub fn login_shell(size: WindowSize) -> Self {
        ExecRequest::argv(Vec::<String>::new()).tty(Tty {
            term: String::new(),
            size,
        })
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

    pub fn tty(mut self, tty: Tty) -> Self {
        self.tty = Some(tty);
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
    /// The terminal of the running command has a new size (TIOCSWINSZ; it gets SIGWINCH).
    Resize(WindowSize),
    /// Sync, then freeze (FIFREEZE) every writable block-device file system, deepest mount
    /// first; answered by `Frozen` or an `Error` (after thawing what was frozen). The agent
    /// thaws by itself when no `Thaw` comes within a minute or this session ends.
    Freeze,
    /// Thaw what this session froze, in reverse; answered by `Thawed`.
    Thaw,

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
    /// The mount points `Freeze` froze, in the order frozen (empty: none to freeze).
    Frozen(Vec<String>),
    /// The mount points `Thaw` thawed, in the order thawed.
    Thawed(Vec<String>),
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
            Message::Resize(_) => ty::RESIZE,
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
            Message::Freeze => ty::FREEZE,
            Message::Thaw => ty::THAW,
            Message::Frozen(_) => ty::FROZEN,
            Message::Thawed(_) => ty::THAWED,
        }
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
        ty::RESIZE => "resize",
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
        ty::FREEZE => "freeze",
        ty::THAW => "thaw",
        ty::FROZEN => "frozen",
        ty::THAWED => "thawed",
        _ => "unknown",
    }
}
