//! virtio-vsock: the guest's socket to the host, written once and served two ways.
//!
//! The host side follows Firecracker's Unix-socket convention so tools written for it work
//! unchanged:
//! - a host program connects to the device's Unix socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <hostport>\n` and the stream
//!   carries the connection. If the guest refuses (no listener), the Unix stream is closed
//!   without `OK`.
//! - a guest connecting to host CID 2, port `P`, reaches a listener at `<uds_path>_<P>`.
//!
//! Layout:
//! - [`device`]: features, queues and config space (`guest_cid`).
//! - [`handler`]: [`VsockHandler`], the virtqueue logic against guest memory, parsing
//!   chains with virtio-vsock's `VsockPacket` (no transport in it).
//! - [`in_process`]: [`VirtioVsock`], the device on kiln's own transport (`kvm`).
//! - [`vhost_user`]: serves the same handler to QEMU as a vhost-user-vsock backend.
//! - [`protocol`]: the virtio-vsock header constants and the packet header we write.
//! - [`connection`]: one connection's state machine, credit accounting and bounded buffer.
//! - [`muxer`]: the connection manager (packets from the guest, RX queue filling) and, in
//!   [`muxer::unix`], the Unix-socket host side.

pub mod connection;
pub mod device;
#[doc(hidden)]
pub mod fuzz;
pub mod handler;
pub mod in_process;
pub mod muxer;
pub mod protocol;
pub mod vhost_user;

pub use device::VsockConfig;
pub use handler::VsockHandler;
pub use in_process::VirtioVsock;
pub use vhost_user::{spawn, VsockHandle};

use std::path::PathBuf;

/// Errors of the vsock device: set-up problems and broken guest queues.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX` and above are not guest CIDs).
    #[error("invalid guest CID {0}: must be in 3..{max}", max = u32::MAX)]
    InvalidGuestCid(u64),
    /// The host-side Unix socket could not be bound.
    #[error("cannot bind vsock host socket {path}: {source}")]
    BindHostSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An epoll, eventfd or timerfd operation failed.
    #[error("vsock event plumbing: {0}")]
    Event(std::io::Error),
    /// The guest put an impossible index in a queue's available ring; the queue is unusable
    /// until the driver resets the device.
    #[error("{queue} queue is broken: {source}")]
    QueueBroken {
        queue: &'static str,
        source: crate::devices::in_order::DrainError,
    },
    /// The vhost-user server failed (socket, thread or daemon).
    #[error("vhost-user vsock server: {0}")]
    Daemon(String),
}

/// Result alias for the vsock device.
pub type Result<T> = std::result::Result<T, VsockError>;
