//! Streams the protocol runs over: Unix sockets, TCP (tests), AF_VSOCK (the guest), and the
//! host side of a vsock device's Unix socket (`CONNECT <port>` handshake).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A byte stream the client can split into a read half and a write half (exec streams
/// stdin while it reads output, so it needs both at once).
pub trait Transport: Read + Write + Send + 'static {
    /// An independent handle on the same stream (a `dup`).
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>>;
    /// Bound blocking reads (None: block forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Close both directions, waking a reader blocked on another handle.
    fn shutdown(&self) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

impl Transport for TcpStream {
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
}

impl Transport for Box<dyn Transport> {
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        (**self).try_clone_transport()
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(t)
    }
    fn shutdown(&self) -> io::Result<()> {
        (**self).shutdown()
    }
}

/// Any connected stream socket held as a file descriptor (the agent's accepted vsock, Unix
/// and TCP connections all look the same to it).
#[derive(Debug)]
pub struct FdStream(OwnedFd);

impl FdStream {
    pub fn new(fd: OwnedFd) -> Self {
        FdStream(fd)
    }
    pub fn try_clone(&self) -> io::Result<FdStream> {
        Ok(FdStream(self.0.try_clone()?))
    }
}

impl AsRawFd for FdStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes; the fd is owned.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for FdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a peer that went away gives EPIPE, not a process-wide SIGPIPE.
        // SAFETY: buf is a valid readable region of buf.len() bytes; the fd is owned.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for FdStream {
    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros().max(if d.as_secs() == 0 { 1 } else { 0 })
                    as libc::suseconds_t,
            },
        };
        // SAFETY: tv is a valid timeval for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn shutdown(&self) -> io::Result<()> {
        // SAFETY: plain syscall on an owned fd.
        let r = unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The guest CID that means "any" when binding, and the loopback CID.
pub const VMADDR_CID_ANY: u32 = u32::MAX;
pub const VMADDR_CID_LOCAL: u32 = 1;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_port = port;
    a.svm_cid = cid;
    a
}

fn new_vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening AF_VSOCK socket.
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Bind `port` on any CID and listen.
    pub fn bind(port: u32) -> io::Result<Self> {
        Self::bind_cid(VMADDR_CID_ANY, port)
    }

    pub fn bind_cid(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_vsock_socket()?;
        let addr = vsock_addr(cid, port);
        // SAFETY: addr is a valid sockaddr_vm and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain syscall on an owned fd.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener(fd))
    }

    pub fn accept(&self) -> io::Result<FdStream> {
        accept_fd(self.0.as_fd().as_raw_fd())
    }
}

impl From<VsockListener> for OwnedFd {
    fn from(l: VsockListener) -> OwnedFd {
        l.0
    }
}

/// accept4 with CLOEXEC on any listening socket.
pub fn accept_fd(listener: RawFd) -> io::Result<FdStream> {
    loop {
        // SAFETY: null address pointers are allowed; the fd is a listening socket.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor we own.
            return Ok(FdStream(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connect to an AF_VSOCK address (used by tests over the loopback transport).
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<FdStream> {
    let fd = new_vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm and the length matches it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FdStream(fd))
}

/// Why the vsock Unix-socket handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect to the vsock socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("i/o error during the CONNECT handshake on {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the vsock device on {path} refused CONNECT {port}: answered {answer:?} (is the agent listening yet?)")]
    Refused {
        path: String,
        port: u32,
        answer: String,
    },
    #[error("the vsock handshake on {path} timed out after {timeout:?}")]
    Timeout { path: String, timeout: Duration },
}

/// Connect to a VM's vsock Unix socket and perform the Firecracker-style handshake:
/// write `CONNECT <port>\n`, read `OK <hostport>\n`; the socket is then the guest's stream.
pub fn connect_vsock_uds(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let p = path.display().to_string();
    let io_err = |source| HandshakeError::Io {
        path: p.clone(),
        source,
    };
    let s = UnixStream::connect(path).map_err(|source| HandshakeError::Connect {
        path: p.clone(),
        source,
    })?;
    let start = Instant::now();
    s.set_write_timeout(Some(timeout)).map_err(io_err)?;
    (&s).write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    // Read byte by byte: anything after the newline already belongs to the protocol.
    let mut line = Vec::with_capacity(32);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(HandshakeError::Timeout {
                path: p.clone(),
                timeout,
            });
        }
        s.set_read_timeout(Some(left)).map_err(io_err)?;
        let mut b = [0u8; 1];
        match (&s).read(&mut b) {
            Ok(0) => {
                return Err(HandshakeError::Refused {
                    path: p.clone(),
                    port,
                    answer: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                line.push(b[0]);
                if line.len() > 64 {
                    return Err(HandshakeError::Refused {
                        path: p.clone(),
                        port,
                        answer: String::from_utf8_lossy(&line).into_owned(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandshakeError::Timeout {
                    path: p.clone(),
                    timeout,
                })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    let ok = answer
        .strip_prefix("OK ")
        .is_some_and(|rest| rest.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(HandshakeError::Refused {
            path: p,
            port,
            answer,
        });
    }
    s.set_read_timeout(None).map_err(io_err)?;
    s.set_write_timeout(None).map_err(io_err)?;
    Ok(s)
}
