//! The frame-port contract, and the in-process port pair that implements it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("port closed")]
    Closed,
    #[error("frame of {0} bytes is larger than the port's MTU")]
    TooLarge(usize),
    #[error("I/O error on port: {0}")]
    Io(#[from] io::Error),
}

/// One end of a link carrying whole Ethernet frames (no virtio-net header).
///
/// The NIC side calls [`FramePort::send`] for frames the guest transmits and
/// [`FramePort::recv`] for frames to deliver to the guest. `recv` never blocks: the NIC
/// polls [`FramePort::rx_fd`] (readable while frames wait) in its event loop, so a port plugs
/// into epoll-driven devices without a thread of its own. Consumers that stop reading before
/// the port is empty (a full guest ring) may register the fd edge-triggered: every new frame
/// makes it readable again.
pub trait FramePort: Send + Sync {
    /// Hand one frame from the guest to the network. May drop it when the network is
    /// congested (as a real link would); returns an error only when the port is unusable.
    fn send(&self, frame: &[u8]) -> Result<(), PortError>;
    /// Take the next frame for the guest into `buf`; `Ok(None)` when none is waiting.
    /// A frame longer than `buf` is an error, never a silent truncation.
    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError>;
    /// A file descriptor that is readable while [`FramePort::recv`] has frames.
    fn rx_fd(&self) -> RawFd;
}

/// Largest frame a port carries: a 1500-byte MTU Ethernet frame with a VLAN tag, rounded up.
pub const MAX_FRAME: usize = 1536;

/// A non-blocking eventfd used as a level "frames waiting" flag.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the returned fd is checked before being owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter (EAGAIN)
        // still leaves the fd readable, which is all a signal needs.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own (non-blocking).
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One direction of a port pair: a bounded frame queue and its readiness fd.
struct Lane {
    frames: Mutex<VecDeque<Vec<u8>>>,
    ready: EventFd,
    capacity: usize,
    dropped: AtomicU64,
}

impl Lane {
    fn new(capacity: usize) -> io::Result<Self> {
        Ok(Lane {
            frames: Mutex::new(VecDeque::new()),
            ready: EventFd::new()?,
            capacity,
            dropped: AtomicU64::new(0),
        })
    }
}

/// One end of an in-process link: what the switch hands the virtio-net device.
///
/// Each direction holds at most `capacity` frames; a sender that outruns its receiver loses
/// frames (counted in [`QueuePort::dropped`]) like a congested link, so a flooding guest
/// cannot grow the host's memory.
pub struct QueuePort {
    rx: Arc<Lane>,
    tx: Arc<Lane>,
    closed: Arc<AtomicBool>,
}

/// A connected pair of [`QueuePort`]s: what one end sends, the other receives.
pub fn port_pair(capacity: usize) -> io::Result<(QueuePort, QueuePort)> {
    let a = Arc::new(Lane::new(capacity)?);
    let b = Arc::new(Lane::new(capacity)?);
    let closed = Arc::new(AtomicBool::new(false));
    Ok((
        QueuePort {
            rx: a.clone(),
            tx: b.clone(),
            closed: closed.clone(),
        },
        QueuePort {
            rx: b,
            tx: a,
            closed,
        },
    ))
}

impl QueuePort {
    /// Frames this end sent that the other end had no room for.
    pub fn dropped(&self) -> u64 {
        self.tx.dropped.load(Ordering::Relaxed)
    }
    /// Mark the link down: both ends then fail with [`PortError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.rx.ready.signal();
        self.tx.ready.signal();
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Dropping either end takes the link down: the other end then reads what is still queued
/// and after that gets [`PortError::Closed`] (the switch unplugs a NIC whose VM went away).
impl Drop for QueuePort {
    fn drop(&mut self) {
        self.close();
    }
}

impl FramePort for QueuePort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        if self.is_closed() {
            return Err(PortError::Closed);
        }
        if frame.len() > MAX_FRAME {
            return Err(PortError::TooLarge(frame.len()));
        }
        let mut q = self.tx.frames.lock().map_err(|_| PortError::Closed)?;
        if q.len() >= self.tx.capacity {
            self.tx.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        q.push_back(frame.to_vec());
        // Signalled under the lock so that `recv` clearing the flag cannot race a push.
        self.tx.ready.signal();
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let mut q = self.rx.frames.lock().map_err(|_| PortError::Closed)?;
        let Some(front) = q.front() else {
            self.rx.ready.clear();
            if self.is_closed() {
                return Err(PortError::Closed);
            }
            return Ok(None);
        };
        if front.len() > buf.len() {
            let n = front.len();
            q.pop_front();
            return Err(PortError::TooLarge(n));
        }
        let n = front.len();
        buf[..n].copy_from_slice(front);
        q.pop_front();
        if q.is_empty() {
            self.rx.ready.clear();
        }
        Ok(Some(n))
    }

    fn rx_fd(&self) -> RawFd {
        self.rx.ready.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn pair_carries_frames_in_order_and_signals() {
        let (a, b) = port_pair(4).unwrap();
        assert!(!readable(b.rx_fd()));
        a.send(&[1, 2, 3]).unwrap();
        a.send(&[4]).unwrap();
        assert!(readable(b.rx_fd()));
        let mut buf = [0u8; 16];
        assert_eq!(b.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(1));
        assert_eq!(buf[0], 4);
        assert!(!readable(b.rx_fd()));
        assert_eq!(b.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn pair_is_bounded_and_counts_drops() {
        let (a, b) = port_pair(2).unwrap();
        for i in 0..5u8 {
            a.send(&[i]).unwrap();
        }
        assert_eq!(a.dropped(), 3);
        let mut buf = [0u8; 4];
        assert_eq!(b.recv(&mut buf).unwrap(), Some(1));
        assert_eq!(buf[0], 0);
    }

    #[test]
    fn too_large_and_closed_are_errors() {
        let (a, b) = port_pair(2).unwrap();
        assert!(matches!(
            a.send(&[0; MAX_FRAME + 1]),
            Err(PortError::TooLarge(_))
        ));
        a.send(&[0; 100]).unwrap();
        let mut small = [0u8; 10];
        assert!(matches!(b.recv(&mut small), Err(PortError::TooLarge(100))));
        a.close();
        assert!(matches!(a.send(&[0]), Err(PortError::Closed)));
        assert!(matches!(b.recv(&mut small), Err(PortError::Closed)));
    }
}
