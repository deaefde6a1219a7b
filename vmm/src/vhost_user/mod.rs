//! Serving a device over vhost-user: shared by blk, net and vsock.
//!
//! [`serve`] listens on a Unix socket and serves one frontend (QEMU) at a time with a fresh
//! backend from the caller's factory. When the frontend goes away, as QEMU does when the
//! guest reboots with `-no-reboot` off or when it restarts the VM, the thread goes back to
//! `accept` and serves the next connection; `VhostUserDaemon::serve` alone would stop after
//! the first one. A new daemon per connection means no vring or memory state survives from
//! one frontend to the next.
//!
//! The returned [`BackendHandle`] stops the server (from any thread, even while it waits in
//! `accept`) and joins it.
//!
//! QEMU side, for each device: guest memory must be shareable, e.g.
//! `-object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem`, then
//! `-chardev socket,id=c0,path=<socket>` and the device (`-device vhost-user-blk-pci,chardev=c0,
//! num-queues=N`, ...).

pub mod dispatch;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory as a vhost-user backend sees it (mapped from the frontend's memfds).
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Errors of the vhost-user server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user backend for {path}: {msg}")]
    Backend { path: PathBuf, msg: String },
    #[error("cannot start vhost-user thread: {0}")]
    Thread(std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("vhost-user thread for {0} panicked")]
    Panicked(PathBuf),
}

/// A running vhost-user server. Dropping it stops and joins it.
pub struct BackendHandle {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

struct Shared {
    stop: EventFd,
    stopping: AtomicBool,
    current: Mutex<Option<ShutdownHandle>>,
    connections: AtomicU64,
}

impl BackendHandle {
    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// How many frontend connections have been accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Ask the server to stop: it drops the current connection (if any) and stops
    /// accepting. Returns at once; [`BackendHandle::join`] waits.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.stop.write(1);
        if let Ok(cur) = self.shared.current.lock() {
            if let Some(h) = cur.as_ref() {
                h.shutdown();
            }
        }
    }

    /// Wait for the server thread to end (after [`BackendHandle::stop`], or by itself on a
    /// fatal error).
    pub fn join(mut self) -> Result<(), ServeError> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), ServeError> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(ServeError::Panicked(self.path.clone()))),
            None => Ok(()),
        }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            if let Err(e) = self.join_inner() {
                warn!("vhost-user server {}: {e}", self.path.display());
            }
        }
    }
}

/// Listen on `socket_path` (an existing socket file there is replaced) and serve frontends
/// one after another, each with a backend from `make_backend`, until stopped.
///
/// `make_backend` runs once per connection; `mem` is the (initially empty) memory the
/// daemon fills from the frontend's memory table, and the backend gets it through
/// `update_memory` as usual.
pub fn serve<T, F>(
    name: &str,
    socket_path: &Path,
    make_backend: F,
) -> Result<BackendHandle, ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
    F: FnMut() -> T + Send + 'static,
{
    serve_with_setup(
        name,
        socket_path,
        make_backend,
        |_: &T, _: &[Arc<VringEpollHandler<T>>]| Ok(()),
    )
}

/// [`serve`], with `setup` run on each new daemon's backend and worker epoll handlers before
/// the frontend is accepted: where a backend registers extra fds to wait on (net registers its
/// frame port's rx fd).
pub fn serve_with_setup<T, F, S>(
    name: &str,
    socket_path: &Path,
    mut make_backend: F,
    mut setup: S,
) -> Result<BackendHandle, ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
    F: FnMut() -> T + Send + 'static,
    S: FnMut(&T, &[Arc<VringEpollHandler<T>>]) -> std::io::Result<()> + Send + 'static,
{
    let path = socket_path.to_path_buf();
    let listener = Listener::new(&path, true).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        stop: EventFd::new(EFD_NONBLOCK).map_err(ServeError::EventFd)?,
        stopping: AtomicBool::new(false),
        current: Mutex::new(None),
        connections: AtomicU64::new(0),
    });
    let thread_shared = shared.clone();
    let thread_path = path.clone();
    let thread_name = name.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("vu-{name}"))
        .spawn(move || {
            accept_loop(
                &thread_name,
                &thread_path,
                listener,
                &thread_shared,
                &mut make_backend,
                &mut setup,
            )
        })
        .map_err(ServeError::Thread)?;
    Ok(BackendHandle {
        path,
        shared,
        thread: Some(thread),
    })
}

fn accept_loop<T, F, S>(
    name: &str,
    path: &Path,
    mut listener: Listener,
    shared: &Shared,
    make_backend: &mut F,
    setup: &mut S,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
    F: FnMut() -> T,
    S: FnMut(&T, &[Arc<VringEpollHandler<T>>]) -> std::io::Result<()>,
{
    let backend_err = |msg: String| ServeError::Backend {
        path: path.to_path_buf(),
        msg,
    };
    loop {
        if !wait_readable(&listener, &shared.stop).map_err(ServeError::EventFd)?
            || shared.stopping.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = make_backend();
        let mut daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), mem)
            .map_err(|e| backend_err(e.to_string()))?;
        setup(&backend, &daemon.get_epoll_handlers()).map_err(|e| backend_err(e.to_string()))?;
        // The listener is readable, so this accept does not block. A failed accept (the
        // client gave up, or fds ran out) ends only that attempt; the pause keeps a
        // persistent failure from spinning.
        if let Err(e) = daemon.start(&mut listener) {
            warn!("vhost-user {name}: accept on {}: {e}", path.display());
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        shared.connections.fetch_add(1, Ordering::AcqRel);
        info!(
            "vhost-user {name}: frontend connected on {}",
            path.display()
        );
        if let Ok(mut cur) = shared.current.lock() {
            *cur = daemon.shutdown_handle();
        }
        // A stop that raced with the accept must still end this connection.
        if shared.stopping.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => info!("vhost-user {name}: frontend disconnected"),
            // A frontend that dies mid-message is a normal way for QEMU to go.
            Err(e) => warn!("vhost-user {name}: connection ended: {e}"),
        }
        if let Ok(mut cur) = shared.current.lock() {
            *cur = None;
        }
        // Dropping the daemon drops its handler, which signals the backend's exit events and
        // joins the vring worker threads.
        drop(daemon);
    }
}

/// Block until the listener has a connection (true) or the stop eventfd fires (false).
fn wait_readable(listener: &Listener, stop: &EventFd) -> std::io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}
