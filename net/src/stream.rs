//! A frame port over a Unix stream socket that QEMU connects to with
//! `-netdev stream,server=off,addr.type=unix,addr.path=PATH`: how a NIC model kiln does not
//! serve itself (`e1000`, `e1000e`, ...) reaches the module switch.
//!
//! The wire format is QEMU's stream framing (`net/stream.c`, the same as `-netdev socket`):
//! every Ethernet frame is preceded by its length as a 4-byte big-endian number. A stream has
//! no message boundaries, so both directions handle partial transfers:
//! - receiving reads at most one frame at a time into a reassembly buffer of [`MAX_FRAME`]
//!   bytes, so what is not read yet stays in the kernel and keeps [`FramePort::rx_fd`]
//!   readable while frames wait. A length of zero or over [`MAX_FRAME`] is a protocol error:
//!   it is logged, the connection is shut down and the claimed length is never allocated.
//! - sending writes a frame whole or not at all. The kernel may take only part of it; the rest
//!   waits in an outgoing buffer of one frame and is written before anything else (at the next
//!   `send` or `recv`: the switch calls `recv` on every port at least once a second), and
//!   frames offered while it waits are dropped like on a congested link. A half-written frame
//!   therefore never desynchronizes the stream.
//!
//! [`StreamListener`] is the socket kiln serves (mode 0600, removed when dropped);
//! [`StreamPort`] is the accepted connection, plugged into the switch with
//! [`crate::Network::attach_port`] like any other port.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::port::{FramePort, PortError, MAX_FRAME};

/// Bytes of the length prefix in front of every frame.
const LEN_BYTES: usize = 4;

/// The Unix socket QEMU's `-netdev stream` connects to.
#[derive(Debug)]
pub struct StreamListener {
    listener: UnixListener,
    path: PathBuf,
}

impl StreamListener {
    /// Listen on `path`, which must not exist yet. The socket is created with mode 0600
    /// (before it appears, so no other user can connect in between).
    pub fn bind(path: &Path) -> io::Result<StreamListener> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        // Linux gives the socket file the mode of the socket's inode (less the umask), so
        // restricting the inode first closes the window a chmod after bind would leave.
        // SAFETY: fchmod on a descriptor we own takes no pointers.
        if unsafe { libc::fchmod(sock.as_raw_fd(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        sock.bind(&socket2::SockAddr::unix(path)?).map_err(named)?;
        let listener = UnixListener::from(OwnedFd::from(sock));
        // From here on the file is ours to remove, whatever fails next.
        let me = StreamListener {
            listener,
            path: path.to_path_buf(),
        };
        let sock = socket2::SockRef::from(&me.listener);
        sock.listen(1).map_err(named)?;
        sock.set_nonblocking(true)?;
        Ok(me)
    }

    /// Where the socket is: QEMU's `addr.path`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's `-netdev` argument for the netdev `id` connecting to this socket.
    pub fn netdev_arg(&self, id: &str) -> String {
        format!(
            "stream,id={id},server=off,addr.type=unix,addr.path={}",
            self.path.display()
        )
    }

    /// The next connection, if one is waiting.
    pub fn try_accept(&self) -> io::Result<Option<StreamPort>> {
        match self.listener.accept() {
            Ok((stream, _)) => StreamPort::new(stream).map(Some),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Wait up to `timeout` for the peer (QEMU connects while it starts, before the guest
    /// runs); a timeout is an error naming the socket.
    pub fn accept(&self, timeout: Duration) -> io::Result<StreamPort> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(port) = self.try_accept()? {
                return Ok(port);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nothing connected to {} within {} ms",
                        self.path.display(),
                        timeout.as_millis()
                    ),
                ));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            match readable_within(self.listener.as_raw_fd(), ms) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
        }
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable_within(fd: RawFd, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Ok(n > 0),
    }
}

impl AsRawFd for StreamListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The frame being received: its length prefix, then its bytes.
struct Reassembly {
    head: [u8; LEN_BYTES],
    head_len: usize,
    /// Always [`MAX_FRAME`] bytes: a peer's claimed length never sizes an allocation.
    body: Box<[u8]>,
    body_len: usize,
}

impl Reassembly {
    /// The frame's length once the prefix is complete.
    fn want(&self) -> Option<usize> {
        (self.head_len == LEN_BYTES).then(|| u32::from_be_bytes(self.head) as usize)
    }
    fn reset(&mut self) {
        self.head_len = 0;
        self.body_len = 0;
    }
}

/// The tail of a frame the kernel took only part of.
struct Outgoing {
    /// Holds at most one prefixed frame.
    buf: Vec<u8>,
    sent: usize,
}

/// The accepted end of a [`StreamListener`]: one NIC's frames in QEMU's stream framing.
pub struct StreamPort {
    stream: UnixStream,
    rx: Mutex<Reassembly>,
    tx: Mutex<Outgoing>,
    down: AtomicBool,
    dropped: AtomicU64,
}

impl std::fmt::Debug for StreamPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPort")
            .field("fd", &self.stream.as_raw_fd())
            .field("down", &self.down.load(Ordering::Relaxed))
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl StreamPort {
    /// Carry frames over `stream`, a connected Unix stream socket (made non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<StreamPort> {
        stream.set_nonblocking(true)?;
        Ok(StreamPort {
            stream,
            rx: Mutex::new(Reassembly {
                head: [0; LEN_BYTES],
                head_len: 0,
                body: vec![0; MAX_FRAME].into_boxed_slice(),
                body_len: 0,
            }),
            tx: Mutex::new(Outgoing {
                buf: Vec::with_capacity(LEN_BYTES + MAX_FRAME),
                sent: 0,
            }),
            down: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// Frames dropped because the peer was not reading fast enough.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Take the link down: the peer sees end of stream, this end then reports
    /// [`PortError::Closed`].
    fn shut(&self) {
        self.down.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Write what `tx` still holds; true when it is empty afterwards.
    fn flush(&self, tx: &mut Outgoing) -> Result<bool, PortError> {
        while tx.sent < tx.buf.len() {
            match self.write(&[&tx.buf[tx.sent..]])? {
                0 => return Ok(false),
                n => tx.sent += n,
            }
        }
        tx.buf.clear();
        tx.sent = 0;
        Ok(true)
    }

    /// One non-blocking `sendmsg` of `parts`: the bytes taken, 0 when the socket is full.
    fn write(&self, parts: &[&[u8]]) -> Result<usize, PortError> {
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        loop {
            // SAFETY: `msg` points at iovecs of live slices that outlive the call; the kernel
            // only reads them.
            let n = unsafe {
                libc::sendmsg(
                    self.stream.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => return Ok(0),
                Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => {
                    self.down.store(true, Ordering::Release);
                    return Err(PortError::Closed);
                }
                _ => return Err(PortError::Io(e)),
            }
        }
    }

    /// One non-blocking read into `buf`: `Ok(None)` when nothing is waiting, `Ok(Some(0))`
    /// at the peer's end of stream.
    fn read(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        loop {
            // SAFETY: reads at most buf.len() bytes into a live, writable slice.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => return Ok(Some(0)),
                _ => return Err(PortError::Io(e)),
            }
        }
    }

    /// The peer broke the framing: log, take the link down, and say why.
    fn protocol_error(&self, why: String) -> PortError {
        tracing::warn!("stream port: {why}; closing the connection");
        self.shut();
        PortError::Io(io::Error::new(io::ErrorKind::InvalidData, why))
    }
}

impl FramePort for StreamPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        if self.down.load(Ordering::Acquire) {
            return Err(PortError::Closed);
        }
        if frame.len() > MAX_FRAME {
            return Err(PortError::TooLarge(frame.len()));
        }
        let mut tx = self.tx.lock().map_err(|_| PortError::Closed)?;
        if !self.flush(&mut tx)? {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let head = (frame.len() as u32).to_be_bytes();
        let n = self.write(&[&head, frame])?;
        if n == 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else if n < LEN_BYTES + frame.len() {
            // Part of the frame is on the wire: the rest must follow before anything else.
            tx.buf.extend_from_slice(&head);
            tx.buf.extend_from_slice(frame);
            tx.sent = n;
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        if self.down.load(Ordering::Acquire) {
            return Err(PortError::Closed);
        }
        // A waiting tail would otherwise wait for the next frame sent to this NIC.
        if let Ok(mut tx) = self.tx.try_lock() {
            self.flush(&mut tx)?;
        }
        let mut rx = self.rx.lock().map_err(|_| PortError::Closed)?;
        let rx = &mut *rx;
        loop {
            let got = match rx.want() {
                None => {
                    let from = rx.head_len;
                    self.read(&mut rx.head[from..])?
                }
                Some(want) => {
                    let from = rx.body_len;
                    self.read(&mut rx.body[from..want])?
                }
            };
            let Some(n) = got else { return Ok(None) };
            if n == 0 {
                self.shut();
                match rx.want() {
                    Some(want) => tracing::warn!(
                        "stream port: peer closed mid-frame ({} of {want} bytes)",
                        rx.body_len
                    ),
                    None if rx.head_len > 0 => {
                        tracing::warn!("stream port: peer closed inside a length prefix")
                    }
                    None => {}
                }
                return Err(PortError::Closed);
            }
            match rx.want() {
                None => {
                    rx.head_len += n;
                    if let Some(want) = rx.want() {
                        if want == 0 || want > MAX_FRAME {
                            return Err(self.protocol_error(format!(
                                "peer sent a frame length of {want} bytes (allowed: 1 to {MAX_FRAME})"
                            )));
                        }
                    }
                }
                Some(want) => {
                    rx.body_len += n;
                    if rx.body_len == want {
                        rx.reset();
                        if want > buf.len() {
                            return Err(PortError::TooLarge(want));
                        }
                        buf[..want].copy_from_slice(&rx.body[..want]);
                        return Ok(Some(want));
                    }
                }
            }
        }
    }

    fn rx_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
