//! Draining a virtio queue in order, shared by the devices whose requests complete in the
//! order they were made available (blk requests, net tx frames).
//!
//! With VIRTIO_RING_F_EVENT_IDX the device turns guest notifications off while it works
//! and, after turning them back on, looks at the avail ring once more: a chain the driver
//! added in between would otherwise wait for a kick that the driver, seeing notifications
//! off, never sends.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// Serve every chain the driver made available: `serve` handles one chain and returns how
/// many bytes it wrote into it, and the chain goes on the used ring. Returns whether the
/// driver must be notified (honouring EVENT_IDX): once per call, not per chain.
///
/// `iter` re-reads the avail index each time and refuses an index that claims more chains
/// than the queue holds, so a lying driver cannot make this loop forever.
pub fn drain<M, F>(queue: &mut Queue, mem: &M, mut serve: F) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemory,
    F: FnMut(DescriptorChain<&M>) -> u32,
{
    let mut used_any = false;
    loop {
        if queue.event_idx_enabled() {
            queue.disable_notification(mem)?;
        }
        let mut served = 0usize;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let written = serve(chain);
            queue.add_used(mem, head, written)?;
            served += 1;
        }
        used_any |= served > 0;
        if !queue.event_idx_enabled() || !queue.enable_notification(mem)? || served == 0 {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem)?)
}
