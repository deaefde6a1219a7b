//! kiln-vmm: the microVM and the virtio devices it shares with the vhost-user backends.
//!
//! Each device under [`devices`] is written once: `device.rs` holds features and config
//! space, `inorder_handler.rs` the request logic on a virtio queue, `queue_handler.rs` the
//! event plumbing, and `vhost_user.rs` serves the same logic to QEMU over vhost-user.

pub mod devices;
