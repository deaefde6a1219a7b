//! kiln-disk: the block layer under every disk kiln touches.
//!
//! The [`BlockDevice`] trait is the contract the virtio-blk device (kiln-vmm), the capture
//! step and `kiln disk` share. Formats (raw, qcow2) live behind it.

mod device;

pub use device::{BlockDevice, BlockError, BlockResult};
