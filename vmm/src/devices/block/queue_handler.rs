//! Event plumbing for the in-process (kiln-vmm) transport: one queue, its kick and call
//! eventfds, and the shared request logic. The transport itself lands later; this keeps the
//! device side ready for it and is what its tests will drive.

use std::sync::Arc;

use kiln_disk::BlockDevice;
use tracing::warn;
use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::device::BlockDeviceConfig;
use super::inorder_handler::{BlockHandler, QueueError};

/// One virtio-blk queue served in process: on each kick, drain the queue and signal the
/// guest if the ring says it wants to be told.
pub struct QueueHandler {
    pub handler: BlockHandler,
    pub queue: Queue,
    pub kick: EventFd,
    pub call: EventFd,
}

impl QueueHandler {
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        config: BlockDeviceConfig,
        queue: Queue,
        kick: EventFd,
        call: EventFd,
    ) -> Self {
        QueueHandler {
            handler: BlockHandler::new(disk, config),
            queue,
            kick,
            call,
        }
    }

    /// Handle a kick: consume the eventfd, serve the queue, signal the guest if needed.
    pub fn on_kick<M: GuestMemory>(&mut self, mem: &M) -> Result<(), QueueError> {
        if let Err(e) = self.kick.read() {
            // EAGAIN on a non-blocking eventfd just means a spurious wake-up.
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!("virtio-blk: reading the kick eventfd: {e}");
            }
        }
        if self.handler.process_queue(&mut self.queue, mem)? {
            if let Err(e) = self.call.write(1) {
                warn!("virtio-blk: signalling the call eventfd: {e}");
            }
        }
        Ok(())
    }
}
