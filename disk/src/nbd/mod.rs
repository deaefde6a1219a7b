//! A [`BlockDevice`] served as an NBD export on a Unix socket, so QEMU can attach a disk kiln
//! writes itself on buses kiln-vmm has no device for (AHCI, virtio-scsi).
//!
//! Fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME, NBD_OPT_LIST,
//! NBD_OPT_ABORT; everything else NBD_REP_ERR_UNSUP), simple replies, and READ, WRITE (FUA
//! flushes), FLUSH, TRIM, WRITE_ZEROES and DISC.
//!
//! One client at a time: QEMU makes one connection per disk. A second connection waits in
//! the listen backlog and is served when the first one ends. A client whose handshake breaks
//! the protocol, or that stops mid-handshake for longer than the handshake timeout, is
//! disconnected with a logged reason; the server goes on with the next one.

mod client_error;
mod handshake;
mod transmission;
mod wire;

#[cfg(test)]
mod tests;

use std::io::{self, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::{BlockDevice, BlockError};
use client_error::ClientError;
use handshake::{Export, Outcome};

/// The largest request kiln accepts: the protocol's interoperable maximum, and a bound on
/// what one client can make the server allocate.
pub const MAX_REQUEST: u32 = 32 << 20;

/// How long a shutdown waits for the in-flight request's reply to reach a client that no
/// longer reads, before it closes the connection under it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the export is offered.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The export's name; the empty name (QEMU's default) is accepted too.
    pub export_name: String,
    /// Smallest request granularity announced: 1, or 512 for devices that want sectors.
    pub min_block: u32,
    /// Preferred request granularity.
    pub preferred_block: u32,
    /// Largest READ or WRITE; at most [`MAX_REQUEST`].
    pub max_request: u32,
    /// A client that takes longer than this between handshake messages is dropped, so a
    /// stalled connection cannot keep the next client waiting forever. `None`: no limit.
    pub handshake_timeout: Option<Duration>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            export_name: String::new(),
            min_block: 1,
            preferred_block: 4096,
            max_request: MAX_REQUEST,
            handshake_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl NbdOptions {
    fn validate(&self) -> Result<(), NbdError> {
        let invalid = |why: String| Err(NbdError::InvalidOptions(why));
        if self.export_name.len() > 4096 {
            return invalid("export name longer than 4096 bytes".into());
        }
        if !matches!(self.min_block, 1 | 512) {
            return invalid(format!("min_block {} is neither 1 nor 512", self.min_block));
        }
        if !self.preferred_block.is_power_of_two() || self.preferred_block < self.min_block {
            return invalid(format!(
                "preferred_block {} must be a power of two of at least min_block",
                self.preferred_block
            ));
        }
        if self.max_request > MAX_REQUEST
            || self.max_request < self.preferred_block
            || !self.max_request.is_multiple_of(self.min_block)
        {
            return invalid(format!(
                "max_request {} must be a multiple of min_block from preferred_block to {MAX_REQUEST}",
                self.max_request
            ));
        }
        Ok(())
    }
}

/// Errors of the server itself; a misbehaving client is logged and dropped, never an error
/// here.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD options: {0}")]
    InvalidOptions(String),
    #[error("cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("NBD server socket: {0}")]
    Io(#[from] io::Error),
    #[error("flushing the served device at shutdown: {0}")]
    Flush(#[source] BlockError),
    #[error("the NBD server thread panicked")]
    Panicked,
}

/// What the serving thread and [`NbdServer::shutdown`] share.
#[derive(Default)]
struct State {
    stopping: bool,
    /// A second handle on the connection being served, so a shutdown can end its reads.
    client: Option<UnixStream>,
}

/// A running NBD export. Dropping it shuts it down as [`NbdServer::shutdown`] does, without
/// reporting a failed flush.
pub struct NbdServer {
    path: PathBuf,
    device: Arc<dyn BlockDevice>,
    state: Arc<Mutex<State>>,
    /// Closing it wakes the accept loop.
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listen on `path` (a new Unix socket, mode 0600) and serve `device` from a thread.
    /// Fails when `path` exists: a socket left by an earlier run is the caller's to remove.
    pub fn bind(
        path: impl AsRef<Path>,
        device: Arc<dyn BlockDevice>,
        options: NbdOptions,
    ) -> Result<NbdServer, NbdError> {
        options.validate()?;
        if !device.size().is_multiple_of(options.min_block.into()) {
            return Err(NbdError::InvalidOptions(format!(
                "device size {} is not a multiple of min_block {}",
                device.size(),
                options.min_block
            )));
        }
        let path = path.as_ref().to_path_buf();
        let bind_err = |source| NbdError::Bind {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        // The socket is the disk: only kiln's user may connect. (Its folder should be
        // private too; this restricts the socket itself right after bind.)
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        listener.set_nonblocking(true)?;
        let (wake, wake_rx) = UnixStream::pair()?;

        let export = Export {
            name: options.export_name.clone(),
            size: device.size(),
            flags: transmission_flags(device.as_ref()),
            min_block: options.min_block,
            preferred_block: options.preferred_block,
            max_block: options.max_request,
        };
        let state = Arc::new(Mutex::new(State::default()));
        let thread = {
            let (device, state) = (device.clone(), state.clone());
            let timeout = options.handshake_timeout;
            std::thread::Builder::new()
                .name("kiln-nbd".into())
                .spawn(move || {
                    accept_loop(
                        &listener,
                        &wake_rx,
                        device.as_ref(),
                        &export,
                        timeout,
                        &state,
                    )
                })?
        };
        tracing::info!(socket = %path.display(), size = device.size(), "NBD export listening");
        Ok(NbdServer {
            path,
            device,
            state,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, let the request being served finish, flush the device and remove the
    /// socket. A client still connected is disconnected.
    pub fn shutdown(mut self) -> Result<(), NbdError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), NbdError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut st = lock(&self.state);
            st.stopping = true;
            // End of stream for the next read: the request being executed completes and
            // is answered, then the loop sees the end.
            if let Some(c) = &st.client {
                let _ = c.shutdown(std::net::Shutdown::Read);
            }
        }
        drop(self.wake.take());
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !thread.is_finished() {
            // The client does not read its replies: stop writing to it as well.
            tracing::warn!(socket = %self.path.display(), "NBD client not reading; closing it");
            if let Some(c) = &lock(&self.state).client {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let joined = thread.join();
        let _ = std::fs::remove_file(&self.path);
        joined.map_err(|_| NbdError::Panicked)?;
        self.device.flush().map_err(NbdError::Flush)?;
        tracing::info!(socket = %self.path.display(), "NBD export stopped");
        Ok(())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(socket = %self.path.display(), "NBD export shutdown: {e}");
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is two plain fields, valid whatever a panicking holder did.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// HAS_FLAGS and every command kiln serves; READ_ONLY for a read-only device.
fn transmission_flags(device: &dyn BlockDevice) -> u16 {
    use wire::*;
    let mut flags =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if device.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

/// Serve clients one after another until the wake socket closes.
fn accept_loop(
    listener: &UnixListener,
    wake: &UnixStream,
    device: &dyn BlockDevice,
    export: &Export,
    handshake_timeout: Option<Duration>,
    state: &Mutex<State>,
) {
    loop {
        match wait_readable(listener, wake) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("NBD server: waiting for clients failed: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("NBD server: accept failed: {e}");
                continue;
            }
        };
        {
            let mut st = lock(state);
            if st.stopping {
                return;
            }
            st.client = stream.try_clone().ok();
        }
        tracing::info!("NBD client connected");
        match serve_client(&stream, device, export, handshake_timeout) {
            Ok(()) => tracing::info!("NBD client done"),
            Err(e) => tracing::warn!("NBD client dropped: {e}"),
        }
        lock(state).client = None;
    }
}

/// Block until a client is waiting (`true`) or the wake socket closed (`false`).
fn wait_readable(listener: &UnixListener, wake: &UnixStream) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll on two descriptors this thread holds open for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if fds[1].revents != 0 {
        return Ok(false);
    }
    Ok(true)
}

fn serve_client(
    stream: &UnixStream,
    device: &dyn BlockDevice,
    export: &Export,
    handshake_timeout: Option<Duration>,
) -> Result<(), ClientError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(handshake_timeout)?;
    // Buffered reads: a request header is 28 bytes, and QEMU sends several at once.
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut writer = stream;
    if handshake::negotiate(&mut reader, &mut writer, export)? == Outcome::Left {
        return Ok(());
    }
    // A connected client may stay idle as long as its guest does.
    stream.set_read_timeout(None)?;
    transmission::serve(&mut reader, &mut writer, device, export.max_block)
}
