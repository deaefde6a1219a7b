//! Draining a virtio queue in order, the one queue walk every device's handler uses: blk
//! requests, net tx and rx frames, vsock TX and RX packets are all completed in the order
//! the driver made their chains available. (blk's `scheduler`, which completes requests as
//! they finish, is the one walk of its own.)
//!
//! While it works the device turns guest notifications off, and after turning them back on
//! it looks at the avail ring once more: a chain the driver added in between would otherwise
//! wait for a kick that the driver, seeing notifications off, never sends. With
//! VIRTIO_RING_F_EVENT_IDX a round that served nothing ends there all the same: the avail
//! event index has not moved since the last round, so the driver does kick for that chain.

use std::convert::Infallible;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// Why a queue could not be drained. The transport logs it and leaves that queue alone
/// until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum DrainError<E = Infallible> {
    /// The ring lies (an avail index claiming more chains than the queue holds) or lies
    /// outside guest memory.
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The device's own source of work failed (net's frame port).
    #[error(transparent)]
    Work(E),
}

/// What a device did with a chain the drain handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Done: the chain goes on the used ring with this many bytes written into it.
    Used(u32),
    /// Nothing to put in it after all: the chain goes back to the avail ring for next time,
    /// and the drain ends.
    Later,
}

/// When the device turns guest notifications off while it drains a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppress {
    /// Only with VIRTIO_RING_F_EVENT_IDX; without it the driver kicks as it likes (blk, net).
    WithEventIdx,
    /// Always, through the used ring's NO_NOTIFY flag when EVENT_IDX is off (vsock).
    Always,
}

/// A device's side of a drain.
pub trait Work<M: GuestMemory> {
    /// What [`Work::has_work`] may fail with.
    type Error;

    /// Whether the device has anything for the next chain. A queue the driver fills (blk,
    /// tx) always has; a queue the device fills (rx) only when something waits for the
    /// guest, and then its chains are taken only as needed.
    fn has_work(&mut self) -> Result<bool, Self::Error> {
        Ok(true)
    }

    /// Serve one chain.
    fn serve(&mut self, chain: DescriptorChain<&M>) -> Served;
}

/// [`Work`] for a queue the driver fills: every chain is served by one function that
/// returns how many bytes it wrote into the chain.
pub struct Every<F>(pub F);

impl<M: GuestMemory, F: FnMut(DescriptorChain<&M>) -> u32> Work<M> for Every<F> {
    type Error = Infallible;

    fn serve(&mut self, chain: DescriptorChain<&M>) -> Served {
        Served::Used((self.0)(chain))
    }
}

/// Serve every chain the driver made available: `serve` handles one chain and returns how
/// many bytes it wrote into it. Returns whether the driver must be notified (honouring
/// EVENT_IDX): once per call, not per chain.
pub fn drain<M, F>(queue: &mut Queue, mem: &M, serve: F) -> Result<bool, DrainError>
where
    M: GuestMemory,
    F: FnMut(DescriptorChain<&M>) -> u32,
{
    drain_with(queue, mem, Suppress::WithEventIdx, &mut Every(serve), None)
}

/// Serve chains for as long as `work` has work and the driver has chains. Returns whether
/// the driver must be notified (honouring EVENT_IDX), once per call; or, with `signal`, asks
/// that after each chain and calls `signal` when it must be, then returns false.
///
/// `iter` re-reads the avail index each time and refuses an index that claims more chains
/// than the queue holds, so a lying driver cannot make this loop forever.
pub fn drain_with<M, W>(
    queue: &mut Queue,
    mem: &M,
    suppress: Suppress,
    work: &mut W,
    mut signal: Option<&mut dyn FnMut()>,
) -> Result<bool, DrainError<W::Error>>
where
    M: GuestMemory,
    W: Work<M>,
{
    let toggle = suppress == Suppress::Always || queue.event_idx_enabled();
    let mut used_any = false;
    loop {
        if toggle {
            queue.disable_notification(mem)?;
        }
        let mut served = 0usize;
        // Whether the round ended for want of a chain, with work left.
        let mut stalled = false;
        while work.has_work().map_err(DrainError::Work)? {
            let Some(chain) = queue.iter(mem)?.next() else {
                stalled = true;
                break;
            };
            let head = chain.head_index();
            match work.serve(chain) {
                Served::Used(written) => {
                    queue.add_used(mem, head, written)?;
                    served += 1;
                    if let Some(signal) = signal.as_mut() {
                        if queue.needs_notification(mem)? {
                            signal();
                        }
                    }
                }
                Served::Later => {
                    queue.go_to_previous_position();
                    break;
                }
            }
        }
        used_any |= served > 0;
        let more = toggle && queue.enable_notification(mem)?;
        if !(stalled && more && (served > 0 || !queue.event_idx_enabled())) {
            break;
        }
    }
    if signal.is_some() {
        return Ok(false);
    }
    Ok(used_any && queue.needs_notification(mem)?)
}
