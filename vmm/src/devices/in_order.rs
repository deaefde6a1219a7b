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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    /// Fills chains with their head index while `left` lasts, then has nothing more; with
    /// `later_at`, hands that chain back instead of filling it.
    struct Fill {
        left: usize,
        later_at: Option<u16>,
        seen: Vec<u16>,
    }

    impl<M: GuestMemory> Work<M> for Fill {
        type Error = &'static str;

        fn has_work(&mut self) -> Result<bool, &'static str> {
            Ok(self.left > 0)
        }

        fn serve(&mut self, chain: DescriptorChain<&M>) -> Served {
            let head = chain.head_index();
            self.seen.push(head);
            if self.later_at == Some(head) {
                return Served::Later;
            }
            self.left -= 1;
            Served::Used(u32::from(head) + 1)
        }
    }

    fn queue_of(m: &GuestMemoryMmap, chains: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(m, 16);
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(0x10_000 * u64::from(i + 1), 64, 2, 0))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let q = vq.create_queue().unwrap();
        (vq, q)
    }

    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, m: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = m.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = vq.used_addr().unchecked_add(4 + 8 * i);
                (
                    m.read_obj(at).unwrap(),
                    m.read_obj(at.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn a_device_without_work_takes_no_chain_and_one_with_work_takes_only_what_it_fills() {
        let m = memory();
        let (vq, mut q) = queue_of(&m, 3);
        let mut fill = Fill {
            left: 0,
            later_at: None,
            seen: Vec::new(),
        };
        assert!(!drain_with(&mut q, &m, Suppress::Always, &mut fill, None).unwrap());
        assert!(fill.seen.is_empty());
        fill.left = 2;
        assert!(drain_with(&mut q, &m, Suppress::Always, &mut fill, None).unwrap());
        assert_eq!(used(&vq, &m), vec![(0, 1), (1, 2)]);
        // The third chain is still there for the next packet.
        fill.left = 1;
        drain_with(&mut q, &m, Suppress::Always, &mut fill, None).unwrap();
        assert_eq!(used(&vq, &m), vec![(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn a_chain_handed_back_stays_available_and_ends_the_drain() {
        let m = memory();
        let (vq, mut q) = queue_of(&m, 3);
        let mut fill = Fill {
            left: 3,
            later_at: Some(1),
            seen: Vec::new(),
        };
        drain_with(&mut q, &m, Suppress::WithEventIdx, &mut fill, None).unwrap();
        assert_eq!(used(&vq, &m), vec![(0, 1)]);
        assert_eq!(fill.seen, vec![0, 1]);
        fill.later_at = None;
        drain_with(&mut q, &m, Suppress::WithEventIdx, &mut fill, None).unwrap();
        assert_eq!(used(&vq, &m), vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(fill.seen, vec![0, 1, 1, 2]);
    }

    #[test]
    fn signalling_asks_after_each_chain_and_the_device_error_is_typed() {
        let m = memory();
        let (_vq, mut q) = queue_of(&m, 2);
        let mut signals = 0;
        let mut signal = || signals += 1;
        let notify = drain(&mut q, &m, |_| 0).unwrap();
        assert!(notify);
        let (_vq, mut q) = queue_of(&m, 2);
        let mut every = Every(|_: DescriptorChain<&GuestMemoryMmap>| 0);
        let notify = drain_with(
            &mut q,
            &m,
            Suppress::WithEventIdx,
            &mut every,
            Some(&mut signal),
        )
        .unwrap();
        // Without EVENT_IDX every check says "tell the driver": once per chain.
        assert!(!notify);
        assert_eq!(signals, 2);

        struct Broken;
        impl<M: GuestMemory> Work<M> for Broken {
            type Error = &'static str;
            fn has_work(&mut self) -> Result<bool, &'static str> {
                Err("port gone")
            }
            fn serve(&mut self, _: DescriptorChain<&M>) -> Served {
                unreachable!()
            }
        }
        let err = drain_with(&mut q, &m, Suppress::Always, &mut Broken, None).unwrap_err();
        assert!(matches!(err, DrainError::Work("port gone")), "{err:?}");
    }
}
