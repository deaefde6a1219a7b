//! A frame port over a `SOCK_SEQPACKET` Unix socket: one Ethernet frame per message, so a
//! NIC can live in another process (the `kvm` engine's per-VM VMM child) while its frames
//! reach the module switch in the parent. Message boundaries are the kernel's: no framing
//! code, and a frame is never split or merged.
//!
//! The socket is non-blocking. A full socket buffer drops the frame, as a congested link
//! does; a peer that went away is [`PortError::Closed`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use crate::port::{FramePort, PortError, MAX_FRAME};

/// One end of a `SOCK_SEQPACKET` link carrying one frame per message.
#[derive(Debug)]
pub struct SeqpacketPort {
    fd: OwnedFd,
}

/// A connected pair of [`SeqpacketPort`]s (both close-on-exec; see
/// [`SeqpacketPort::inheritable`] for the end another process gets).
pub fn seqpacket_pair() -> io::Result<(SeqpacketPort, SeqpacketPort)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the two-element array on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((SeqpacketPort { fd: a }, SeqpacketPort { fd: b }))
}

impl SeqpacketPort {
    /// Take over `fd`, which must be a connected `SOCK_SEQPACKET` socket (an inherited end of
    /// [`seqpacket_pair`]). It is made non-blocking and close-on-exec; anything else is an
    /// error naming what the descriptor is.
    pub fn from_fd(fd: OwnedFd) -> io::Result<SeqpacketPort> {
        let raw = fd.as_raw_fd();
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `ty`, a live c_int.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("fd {raw} is not a socket: {e}"),
            ));
        }
        if ty != libc::SOCK_SEQPACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {raw} is a socket of type {ty}, not SOCK_SEQPACKET"),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL/F_SETFD on a descriptor we own take no pointers.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl < 0 || libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(SeqpacketPort { fd })
    }

    /// Take over the inherited descriptor number `fd` (what a spawned process was told).
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process owns or closes.
    pub unsafe fn from_raw_inherited(fd: RawFd) -> io::Result<SeqpacketPort> {
        // SAFETY: the caller guarantees `fd` is open and owned by nobody else.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Clear close-on-exec on this end so a child process started after this call inherits
    /// it (under the same descriptor number). Call it in the child between fork and exec
    /// (`pre_exec`) so no other program started by this process gets the descriptor.
    pub fn inheritable(fd: RawFd) -> io::Result<()> {
        // SAFETY: F_SETFD takes no pointers; async-signal-safe.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Give up ownership of the descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for SeqpacketPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SeqpacketPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for SeqpacketPort {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl FramePort for SeqpacketPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        if frame.len() > MAX_FRAME {
            return Err(PortError::TooLarge(frame.len()));
        }
        // SAFETY: sends frame.len() bytes from a live slice on a socket we own.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // A full socket buffer: the frame is dropped, as on a congested link.
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(()),
                Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => {
                    Err(PortError::Closed)
                }
                _ => Err(PortError::Io(e)),
            };
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        // MSG_TRUNC makes recv return the message's real length, so a frame longer than
        // `buf` is reported, never silently cut.
        // SAFETY: receives at most buf.len() bytes into a live, writable slice.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => Err(PortError::Closed),
                _ => Err(PortError::Io(e)),
            };
        }
        let n = n as usize;
        // Frames are never empty; a zero-length read is the peer's end of stream.
        if n == 0 {
            return Err(PortError::Closed);
        }
        if n > buf.len() {
            return Err(PortError::TooLarge(n));
        }
        Ok(Some(n))
    }

    fn rx_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_boundaries_both_ways() {
        let (a, b) = seqpacket_pair().unwrap();
        let mut buf = [0u8; MAX_FRAME];
        assert!(b.recv(&mut buf).unwrap().is_none(), "nothing sent yet");
        a.send(&[1u8; 60]).unwrap();
        a.send(&[2u8; MAX_FRAME]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert_eq!(&buf[..60], &[1u8; 60]);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(MAX_FRAME));
        assert!(buf.iter().all(|x| *x == 2));
        b.send(b"back").unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), Some(4));
        assert_eq!(&buf[..4], b"back");
    }

    #[test]
    fn oversize_frames_and_short_buffers_are_errors() {
        let (a, b) = seqpacket_pair().unwrap();
        assert!(matches!(
            a.send(&[0u8; MAX_FRAME + 1]),
            Err(PortError::TooLarge(_))
        ));
        a.send(&[7u8; 100]).unwrap();
        let mut small = [0u8; 10];
        assert!(matches!(b.recv(&mut small), Err(PortError::TooLarge(100))));
    }

    #[test]
    fn a_closed_peer_is_closed_not_a_hang() {
        let (a, b) = seqpacket_pair().unwrap();
        a.send(b"last").unwrap();
        drop(a);
        let mut buf = [0u8; 64];
        assert_eq!(
            b.recv(&mut buf).unwrap(),
            Some(4),
            "queued frames still arrive"
        );
        assert!(matches!(b.recv(&mut buf), Err(PortError::Closed)));
        assert!(matches!(b.send(b"x"), Err(PortError::Closed)));
    }

    #[test]
    fn a_full_socket_drops_instead_of_blocking() {
        let (a, _b) = seqpacket_pair().unwrap();
        for _ in 0..10_000 {
            a.send(&[0u8; MAX_FRAME]).unwrap();
        }
    }

    #[test]
    fn from_fd_checks_the_socket_type() {
        let (a, _b) = seqpacket_pair().unwrap();
        assert!(SeqpacketPort::from_fd(a.into_fd()).is_ok());
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = SeqpacketPort::from_fd(OwnedFd::from(f)).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let (s, _t) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = SeqpacketPort::from_fd(OwnedFd::from(s)).unwrap_err();
        assert!(e.to_string().contains("not SOCK_SEQPACKET"), "{e}");
    }
}
