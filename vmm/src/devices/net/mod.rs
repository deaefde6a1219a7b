//! virtio-net over a [`kiln_net::FramePort`] (a kiln-net switch port, or a TAP device).
//!
//! - [`device`]: features and configuration space (MAC from the config, link up).
//! - [`handler`]: [`NetHandler`], moving frames between the rx/tx queues and the port
//!   against guest memory (no transport in it).
//! - [`in_process`]: [`VirtioNet`], the device on kiln's own transport (`kvm`).
//! - [`vhost_user`]: the same logic served to QEMU as a vhost-user-net backend
//!   ([`vhost_user::spawn`]`(socket, port, mac) -> NetHandle`), with `qemu_relay` in front of
//!   it for QEMU 7.2's message order.
//!
//! Guest descriptor chains are untrusted: a malformed chain is returned to the guest unused
//! with a logged reason; a ring whose indices lie stops that queue (logged) until the driver
//! resets the device. Frames are never lost or reordered inside the device.

pub mod device;
mod fuzz;
pub mod handler;
pub mod in_process;
mod qemu_relay;
pub mod vhost_user;

pub use device::NetDeviceConfig;
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use handler::{NetHandler, NetQueueError};
pub use in_process::VirtioNet;
pub use vhost_user::{spawn, NetHandle};
