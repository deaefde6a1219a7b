//! The frame-port contract.

use std::io;
use std::os::fd::RawFd;

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
/// into epoll-driven devices without a thread of its own.
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
