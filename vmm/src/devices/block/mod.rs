//! virtio-blk over a [`kiln_disk::BlockDevice`].
//!
//! - [`device`]: features, configuration space, [`BlockOptions`].
//! - [`handler`]: [`BlockHandler`], the request logic on a `virtio_queue::Queue` and guest
//!   memory (no transport in it), serving requests one after another.
//! - [`chain`]: a descriptor chain checked against guest memory and read as two byte
//!   streams (what the device reads, what it writes).
//! - [`scheduler`]: [`IoPool`], a queue served with requests running side by side on a few
//!   persistent I/O workers, completed as they finish, FLUSH as a barrier. Both devices
//!   below schedule their requests with it, so the `kvm` and `qemu` engines serve a disk
//!   alike.
//! - [`in_process`]: [`VirtioBlock`], the device on kiln's own transport (`kvm`): a
//!   `QueueWorker` per queue, on an [`IoPool`] per queue.
//! - [`vhost_user`]: the same logic served to QEMU as a vhost-user-blk backend, on an
//!   [`IoPool`] per queue.

pub mod chain;
pub mod device;
mod fuzz;
pub mod handler;
pub mod in_process;
#[cfg(test)]
mod placement_tests;
pub mod scheduler;
pub mod vhost_user;

pub use device::{BlockDeviceConfig, BlockOptions};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use handler::{BlockHandler, Completion, QueueError};
pub use in_process::VirtioBlock;
pub use scheduler::{IoPool, IO_WORKERS};
