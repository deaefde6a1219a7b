//! kiln-net: one isolated network per module, in user space.
//!
//! [`FramePort`] is the contract between a NIC (kiln-vmm's virtio-net, in process or over
//! vhost-user) and whatever carries its Ethernet frames (the module switch, a TAP device).

mod port;

pub use port::{FramePort, PortError};
