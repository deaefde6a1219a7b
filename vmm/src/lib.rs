//! kiln-vmm: the microVM and the virtio devices it shares with the vhost-user backends.
//!
//! Each device under [`devices`] is written once: `device.rs` holds features and config
//! space, `inorder_handler.rs` the request logic on a virtio queue, `queue_handler.rs` the
//! event plumbing, and `vhost_user.rs` serves the same logic to QEMU over vhost-user.

pub mod arch;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod doctor;
pub mod exit;
pub mod machine;
pub mod memory;
pub mod phases;
pub mod power;
pub mod process;
pub mod serial;
pub mod transport;
pub mod vcpu;
pub mod vhost_user;
pub mod vm;
