//! virtio-blk over a [`kiln_disk::BlockDevice`].
//!
//! - [`device`]: features, configuration space, [`BlockOptions`].
//! - [`chain`]: a descriptor chain checked against guest memory and read as two byte
//!   streams (what the device reads, what it writes).
//! - [`inorder_handler`]: [`BlockHandler`], the request logic on a `virtio_queue::Queue`
//!   (shared by every transport), serving requests one after another.
//! - [`io_pool`]: a queue served with requests running side by side on a few persistent
//!   I/O workers (the vhost-user backend's path).
//! - [`vhost_user`]: the same logic served to QEMU as a vhost-user-blk backend, on an
//!   [`IoPool`] per queue.
//!
//! The in-process device is `crate::transport::block::VirtioBlock`: [`BlockHandler`] on a
//! `QueueWorker` per queue, requests served in order.

pub mod chain;
pub mod device;
mod fuzz;
pub mod inorder_handler;
pub mod io_pool;
#[cfg(test)]
mod placement_tests;
pub mod vhost_user;

pub use device::{BlockDeviceConfig, BlockOptions};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use inorder_handler::{BlockHandler, Completion, QueueError};
pub use io_pool::{IoPool, IO_WORKERS};
