//! TAP devices as frame ports: for bare-metal hosts (a VM NIC on a host TAP) and for tests
//! (a network namespace plugged into the switch).
//!
//! Raw `TUNSETIFF` ioctls rather than tun-rs: a TAP port needs open, one ioctl and
//! non-blocking read/write, and tun-rs brings an async runtime layer that nothing here uses.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::port::{FramePort, PortError};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device (no packet-info header), non-blocking.
pub struct TapPort {
    fd: OwnedFd,
    name: String,
}

impl TapPort {
    /// Create (or attach to) the TAP device `name`. Needs CAP_NET_ADMIN unless the device was
    /// made persistent for this user.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TAP name {name:?} must be 1..{} bytes", libc::IFNAMSIZ),
            ));
        }
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: path is a valid NUL-terminated string; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq-sized struct, which `req` is.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TapPort {
            fd,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FramePort for TapPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        // SAFETY: writes frame.len() bytes from a live slice to our fd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // A full TAP queue or an interface that is down drops the frame, as a link does.
                Some(libc::EAGAIN) | Some(libc::EIO) => Ok(()),
                _ => Err(PortError::Io(e)),
            };
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        // One spare byte tells a frame that fills `buf` exactly from one that was cut.
        let mut spare = [0u8; 1];
        let iov = [
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: 1,
            },
        ];
        // SAFETY: both iovecs point at live, writable buffers of the stated lengths.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(PortError::Io(e)),
            };
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(PortError::TooLarge(n));
        }
        Ok(Some(n))
    }

    fn rx_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
