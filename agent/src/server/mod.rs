//! The guest side: listeners, sessions, and the handlers behind each request. The
//! `kiln-agent` binary is a thin command line over [`serve`].

mod cleanup;
mod exec;
mod files;
mod freeze;
pub mod mounts;
mod netconfig;
pub mod power;
pub mod priority;
mod pty;
mod reaper;
mod rtnetlink;
mod session;
mod sysinfo;
pub mod users;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use power::PowerAction;
pub use sysinfo::{guest_info, parse_os_release};

use crate::transport::{self, FdStream, VsockListener};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK on any CID (the guest's normal transport).
    Vsock(u32),
    /// A Unix socket path (tests, local use).
    Unix(PathBuf),
    /// A TCP address given as numbers (no name lookups in a static binary).
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    /// `vsock:PORT`, `unix:PATH`, `tcp:IP:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("vsock:") {
            return p
                .parse()
                .map(Listen::Vsock)
                .map_err(|e| format!("bad vsock port {p:?}: {e}"));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a
                .parse()
                .map(Listen::Tcp)
                .map_err(|e| format!("bad TCP address {a:?} (numeric IP:PORT): {e}"));
        }
        Err(format!(
            "unknown listen address {s:?}: use vsock:PORT, unix:PATH or tcp:IP:PORT"
        ))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Vsock(p) => write!(f, "vsock:{p}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<Listen>,
    /// Where scripts are written before they run.
    pub work_dir: PathBuf,
    /// The guest is ready when all of these paths exist.
    pub ready_when: Vec<PathBuf>,
    /// When set, the guest is ready only once the local file systems the boot mounts are
    /// mounted (`mounts::pending` under this root, `/` in a guest).
    pub mounts_root: Option<PathBuf>,
    /// When set, the autogroup nice of the agent's session and of each step's own session
    /// (`priority`): steps run ahead of the rest of a still-booting guest.
    pub autogroup_nice: Option<i32>,
    pub power: PowerAction,
    /// Sessions beyond this are refused with an error.
    pub max_sessions: usize,
    /// How long output is still read after a command exits (background processes may hold
    /// its pipes open).
    pub linger: Duration,
    /// Where passwd and group are read from (normally /etc).
    pub etc_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![Listen::Vsock(crate::VSOCK_PORT)],
            work_dir: PathBuf::from("/run/kiln-agent"),
            ready_when: Vec::new(),
            mounts_root: None,
            autogroup_nice: None,
            power: PowerAction::System,
            max_sessions: 256,
            linger: Duration::from_secs(1),
            etc_dir: PathBuf::from("/etc"),
        }
    }
}

pub(crate) struct Shared {
    pub config: Config,
    /// The one freeze of the guest's file systems, whichever session holds it.
    pub freezes: Arc<freeze::Freezes<freeze::SystemFreezer>>,
    sessions: AtomicUsize,
    next_id: AtomicU64,
}

/// Bind every listener and serve until the process ends. Listeners that cannot bind yet
/// (vsock before its kernel module loads) are retried every second in their own thread.
pub fn serve(config: Config) -> io::Result<()> {
    if config.listen.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listen address",
        ));
    }
    reaper::start_if_init();
    if let Some(nice) = config.autogroup_nice {
        match priority::raise_own(nice) {
            Ok(()) => tracing::info!("steps run at autogroup nice {nice}"),
            Err(e) => tracing::info!("autogroup nice not set ({e}): steps run at the usual share"),
        }
    }
    let shared = Arc::new(Shared {
        config,
        freezes: freeze::Freezes::new(freeze::SystemFreezer, freeze::THAW_LIMIT),
        sessions: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
    });
    let mut threads = Vec::new();
    for l in shared.config.listen.clone() {
        // Bind the test transports now so a bad path or port fails the start.
        let bound = match &l {
            Listen::Vsock(_) => None,
            Listen::Unix(p) => {
                // A stale socket from an earlier run would make bind fail.
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                Some(OwnedFd::from(UnixListener::bind(p)?))
            }
            Listen::Tcp(a) => Some(OwnedFd::from(TcpListener::bind(*a)?)),
        };
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("listen {l}"))
                .spawn(move || listen_loop(l, bound, sh))?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn listen_loop(l: Listen, bound: Option<OwnedFd>, shared: Arc<Shared>) {
    let fd = match (bound, &l) {
        (Some(fd), _) => fd,
        (None, Listen::Vsock(port)) => {
            let started = std::time::Instant::now();
            let mut tried = false;
            loop {
                match VsockListener::bind(*port) {
                    Ok(v) => break OwnedFd::from(v),
                    Err(e) => {
                        // The virtio vsock transport is a module on most distro kernels.
                        // It is loaded from here rather than before the agent starts (the
                        // unit's ExecStartPre cost a second of the boot under TCG), on a
                        // thread that also reaps modprobe; systemd-modules-load or udev may
                        // be loading it too, and whichever finishes first ends the wait.
                        if !tried {
                            tried = true;
                            tracing::info!(
                                "cannot listen on vsock port {port} yet ({e}); loading the transport and retrying"
                            );
                            std::thread::spawn(|| {
                                std::process::Command::new("modprobe")
                                    .args(["-q", "vmw_vsock_virtio_transport"])
                                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                                    .stdin(std::process::Stdio::null())
                                    .status()
                            });
                        }
                        // Often while the module loads, then every second.
                        let pause = if started.elapsed() < Duration::from_secs(10) {
                            Duration::from_millis(20)
                        } else {
                            Duration::from_secs(1)
                        };
                        std::thread::sleep(pause);
                    }
                }
            }
        }
        (None, _) => return,
    };
    tracing::info!("listening on {l}");
    loop {
        match transport::accept_fd(fd.as_raw_fd()) {
            Ok(s) => start_session(s, &l, &shared),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept on {l} failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn start_session(stream: FdStream, l: &Listen, shared: &Arc<Shared>) {
    if matches!(l, Listen::Tcp(_)) {
        let one: libc::c_int = 1;
        // SAFETY: valid option pointer and length for TCP_NODELAY.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let n = shared.sessions.fetch_add(1, Ordering::SeqCst);
    if n >= shared.config.max_sessions {
        shared.sessions.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(session = id, "refusing a session: {n} already open");
        session::refuse(stream, n);
        return;
    }
    let sh = shared.clone();
    let r = std::thread::Builder::new()
        .name(format!("session-{id}"))
        .spawn(move || {
            session::run(stream, id, &sh);
            sh.sessions.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = r {
        shared.sessions.fetch_sub(1, Ordering::SeqCst);
        tracing::error!(session = id, "cannot start a session thread: {e}");
    }
}
