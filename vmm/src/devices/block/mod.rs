//! virtio-blk over a [`kiln_disk::BlockDevice`].
//!
//! - [`device`]: features, configuration space, [`BlockOptions`].
//! - [`inorder_handler`]: the request logic on a `virtio_queue::Queue` (shared by every
//!   transport).
//! - [`io_pool`]: a queue served with requests running side by side on a few persistent
//!   I/O workers (the vhost-user backend's path).
//! - [`queue_handler`]: kick/call plumbing for the in-process transport.
//! - [`vhost_user`]: the same logic served to QEMU as a vhost-user-blk backend.

pub mod chain;
pub mod device;
mod fuzz;
pub mod inorder_handler;
pub mod io_pool;
#[cfg(test)]
mod placement_tests;
pub mod queue_handler;
pub mod vhost_user;

pub use device::{BlockDeviceConfig, BlockOptions};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use inorder_handler::{BlockHandler, Completion, QueueError};
pub use io_pool::{IoPool, IO_WORKERS};
