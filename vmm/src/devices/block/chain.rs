//! A descriptor chain seen as two byte streams: what the driver gave the device to read,
//! followed by what it gave the device to write.
//!
//! virtio 1.x lets a driver split a request's header, data and status across descriptors any
//! way it likes, so the handler never assumes one descriptor per part: it reads the header
//! from the first 16 readable bytes and writes the status into the last writable byte.
//! Every descriptor is checked against guest memory here, before any I/O, so a request that
//! names memory the guest does not have is refused whole instead of half done.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
    VolatileSlice,
};

/// Why a chain was refused before any request logic ran.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index} at {addr:#x} length {len} lies outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: usize },
    #[error("chain has no device-writable byte for the status")]
    NoStatus,
}

/// A refused chain: why, and where its status byte is if it still has a usable one.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub error: ChainError,
    pub status_addr: Option<GuestAddress>,
}

/// One guest-memory range of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The readable and writable ranges of one chain, checked against guest memory.
#[derive(Debug, Default)]
pub struct ChainLayout {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl ChainLayout {
    /// Walk `chain` and check each descriptor. The chain iterator of virtio-queue already
    /// stops on loops (at most queue-size descriptors), on nested indirect tables and on a
    /// total length past 4 GiB; this adds the memory-bounds and flag-order checks.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Self, Refused>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut chain = chain;
        // One pass, nothing collected first: this runs for every request, and a Linux read
        // of 512 KiB is a chain of up to 256 descriptors. Room for a typical chain up front
        // (one header, up to 128 pages of data) saves the regrowth.
        let mut layout = ChainLayout {
            readable: Vec::with_capacity(4),
            writable: Vec::with_capacity(32),
        };
        let mut error = None;
        let mut last = None;
        let mut next_index = 0usize;
        while let Some(d) = chain.next() {
            let mem = chain.memory();
            let index = next_index;
            next_index += 1;
            last = Some((d.addr(), d.len(), d.is_write_only()));
            if error.is_some() || d.len() == 0 {
                // After a refusal the walk goes on only to find the last descriptor, where
                // the error status goes.
                continue;
            }
            // The device reads readable descriptors and writes writable ones: check for that.
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !in_memory(mem, d.addr(), d.len(), access) {
                error = Some(ChainError::OutsideMemory {
                    index,
                    addr: d.addr().0,
                    len: d.len(),
                });
                continue;
            }
            let list = if d.is_write_only() {
                &mut layout.writable
            } else if layout.writable.is_empty() {
                &mut layout.readable
            } else {
                error = Some(ChainError::ReadableAfterWritable { index });
                continue;
            };
            // A descriptor that continues the previous one in guest memory extends it: the
            // stream is the same, and there is one piece less to map later. (Capped so the
            // length still fits a u32.)
            match list.last_mut() {
                Some(prev)
                    if prev.addr.0.checked_add(u64::from(prev.len)) == Some(d.addr().0)
                        && prev.len.checked_add(d.len()).is_some() =>
                {
                    prev.len += d.len();
                }
                _ => list.push(Segment {
                    addr: d.addr(),
                    len: d.len(),
                }),
            }
        }
        if error.is_none() && layout.writable.is_empty() {
            error = Some(ChainError::NoStatus);
        }
        let Some(error) = error else {
            return Ok(layout);
        };
        // Where an error status can still go: the last byte of the last descriptor, if that
        // descriptor is device-writable and the byte is guest memory.
        let mem = chain.memory();
        let status_addr = last.and_then(|(addr, len, write_only)| {
            let a = addr.0.checked_add(u64::from(len).checked_sub(1)?)?;
            (write_only && mem.check_range(GuestAddress(a), 1, Permissions::Write))
                .then_some(GuestAddress(a))
        });
        Err(Refused { error, status_addr })
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total writable bytes (data for the device to fill plus the status byte).
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Whether `len` bytes at `addr` are guest memory the device may access as `access`.
///
/// Fast path for memory without an IOMMU: one region lookup (a binary search) and a bounds
/// check, which is what vm-memory's `check_range` comes down to for a range inside one
/// region, without its slice iterator (a per-descriptor cost on every request). Ranges that
/// cross regions, and IOMMU-translated memory, take `check_range`.
fn in_memory<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
    access: Permissions,
) -> bool {
    if let Some(r) = mem.physical_memory().and_then(|pm| pm.find_region(addr)) {
        if let Some(last) = addr.0.checked_add(u64::from(len).saturating_sub(1)) {
            if last <= r.last_addr().0 {
                return true;
            }
        }
    }
    mem.check_range(addr, len as usize, access)
}

/// Copy `buf.len()` bytes of the stream formed by `segs`, starting `offset` bytes into it,
/// into `buf`. Returns false if the stream is too short or memory refuses the access.
pub fn read_stream<M: GuestMemory>(mem: &M, segs: &[Segment], offset: u64, buf: &mut [u8]) -> bool {
    walk(segs, offset, buf.len(), |addr, range| {
        mem.read_slice(&mut buf[range], addr).is_ok()
    })
}

/// Copy `buf` into the stream formed by `segs`, starting `offset` bytes into it.
pub fn write_stream<M: GuestMemory>(mem: &M, segs: &[Segment], offset: u64, buf: &[u8]) -> bool {
    walk(segs, offset, buf.len(), |addr, range| {
        mem.write_slice(&buf[range], addr).is_ok()
    })
}

/// Visit the pieces of `len` bytes starting `offset` bytes into the stream: `f(address, range
/// of the caller's buffer)`.
fn walk(
    segs: &[Segment],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        // `offset < seg_len <= u32::MAX`, so these fit in usize on every supported host.
        let avail = (seg_len - offset) as usize;
        let n = avail.min(len - done);
        let Some(addr) = seg.addr.0.checked_add(offset) else {
            return false;
        };
        if !f(GuestAddress(addr), done..done + n) {
            return false;
        }
        done += n;
        offset = 0;
    }
    done == len
}

/// Guest memory viewed in place: the host mappings behind part of a chain's stream, so the
/// disk can read into, or write from, the guest's own pages without a bounce copy.
pub struct HostView<'m, M: GuestMemory + 'm> {
    slices: Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
    /// (host address, length) of `slices`, with pieces that touch merged: what the disk's
    /// vectored I/O gets.
    runs: Vec<(usize, usize)>,
}

impl<'m, M: GuestMemory + 'm> HostView<'m, M> {
    /// The mappings behind `len` bytes of the stream formed by `segs`, starting `offset`
    /// bytes into it. `None` when memory refuses a piece or two pieces share host bytes
    /// (a guest may name the same page twice; the bounce path copes with that, and here it
    /// would make two mutable views of one byte).
    pub fn new(
        mem: &'m M,
        segs: &[Segment],
        offset: u64,
        len: usize,
        access: Permissions,
    ) -> Option<Self> {
        let mut slices = Vec::with_capacity(segs.len());
        let complete = walk(segs, offset, len, |addr, range| {
            let Ok(it) = mem.get_slices(addr, range.len(), access) else {
                return false;
            };
            for s in it {
                match s {
                    Ok(s) => slices.push(s),
                    Err(_) => return false,
                }
            }
            true
        });
        if !complete {
            return None;
        }
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(slices.len());
        let mut ascending = true;
        for s in &slices {
            let (p, n) = (s.ptr_guard().as_ptr() as usize, s.len());
            match runs.last_mut() {
                Some((lp, ln)) if *lp + *ln == p => *ln += n,
                Some((lp, ln)) => {
                    ascending &= *lp + *ln < p;
                    runs.push((p, n));
                }
                None => runs.push((p, n)),
            }
        }
        // Runs that follow one another upwards cannot overlap; otherwise sort a copy to
        // look for host bytes named twice.
        if !ascending {
            let mut sorted = runs.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
                return None;
            }
        }
        Some(HostView { slices, runs })
    }

    /// Let `f` fill the viewed guest bytes in stream order, then mark them dirty.
    pub fn fill<T>(&self, f: impl FnOnce(&mut [IoSliceMut<'_>]) -> T) -> T {
        let mut iov: Vec<IoSliceMut<'_>> = self
            .runs
            .iter()
            // SAFETY: each run lies inside guest mappings borrowed for 'm (the slices above
            // keep them), the runs do not overlap one another (checked in `new`), and the
            // views die before this returns. The guest may touch the same bytes meanwhile,
            // as it may during any DMA; the disk only stores bytes into them.
            .map(|&(p, n)| {
                IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, n) })
            })
            .collect();
        let r = f(&mut iov);
        drop(iov);
        for s in &self.slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        r
    }

    /// Let `f` read the viewed guest bytes in stream order.
    pub fn read<T>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> T) -> T {
        let iov: Vec<IoSlice<'_>> = self
            .runs
            .iter()
            // SAFETY: each run lies inside guest mappings borrowed for 'm and the views die
            // before this returns; the disk only loads bytes from them.
            .map(|&(p, n)| IoSlice::new(unsafe { std::slice::from_raw_parts(p as *const u8, n) }))
            .collect();
        f(&iov)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn host_view_fills_scattered_pages_in_stream_order() {
        let m = mem();
        // Out of order, with a piece that crosses from one region into the next.
        let segs = [seg(0x3000, 8), seg(0x1000, 8), seg(0xfffc, 8)];
        let v = HostView::new(&m, &segs, 4, 16, Permissions::Write).expect("view");
        v.fill(|iov| {
            let mut n = 0u8;
            for b in iov.iter_mut() {
                for x in b.iter_mut() {
                    *x = n;
                    n += 1;
                }
            }
        });
        let mut back = [0u8; 16];
        assert!(read_stream(&m, &segs, 4, &mut back));
        assert_eq!(back, core::array::from_fn(|i| i as u8));
        // Nothing outside the viewed bytes changed.
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0);
    }

    #[test]
    fn host_view_merges_touching_pieces_and_reads_them() {
        let m = mem();
        m.write_slice(b"abcdefgh", GuestAddress(0x2000)).unwrap();
        let segs = [seg(0x2000, 4), seg(0x2004, 4)];
        let v = HostView::new(&m, &segs, 0, 8, Permissions::Read).expect("view");
        assert_eq!(v.runs.len(), 1);
        let got = v.read(|iov| {
            iov.iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, b"abcdefgh");
    }

    #[test]
    fn host_view_refuses_pages_named_twice_and_memory_it_lacks() {
        let m = mem();
        let twice = [seg(0x1000, 16), seg(0x1008, 16)];
        assert!(HostView::new(&m, &twice, 0, 32, Permissions::Write).is_none());
        let outside = [seg(0x1f000, 0x2000)];
        assert!(HostView::new(&m, &outside, 0, 0x2000, Permissions::Write).is_none());
        // A stream shorter than asked for.
        assert!(HostView::new(&m, &[seg(0x1000, 8)], 0, 9, Permissions::Write).is_none());
    }

    /// The first chain on a mock queue holding `descs`.
    fn parse_chain(
        m: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, bool)],
    ) -> Result<ChainLayout, Refused> {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::{mock::MockSplitQueue, Queue, QueueOwnedT};
        let vq = MockSplitQueue::create(m, GuestAddress(0x8000), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        ChainLayout::parse(chain)
    }

    #[test]
    fn parse_merges_descriptors_that_continue_each_other() {
        let m = mem();
        // Header and data contiguous; two data pieces contiguous, one apart; the status
        // byte right after the last data piece (it is writable too, so it merges).
        let l = parse_chain(
            &m,
            &[
                (0x1000, 16, false),
                (0x1010, 512, false),
                (0x3000, 512, true),
                (0x3200, 512, true),
                (0x5000, 512, true),
                (0x5200, 1, true),
            ],
        )
        .expect("valid chain");
        assert_eq!(l.readable, vec![seg(0x1000, 528)]);
        assert_eq!(l.writable, vec![seg(0x3000, 1024), seg(0x5000, 513)]);
        assert_eq!((l.readable_len(), l.writable_len()), (528, 1537));
    }

    #[test]
    fn a_refused_chain_still_names_its_last_byte_for_the_status() {
        let m = mem();
        // The bad descriptor comes first; the walk goes on to find the status byte.
        let r = parse_chain(
            &m,
            &[
                (0x1000, 16, false),
                (0x1f000, 0x2000, true),
                (0x5000, 1, true),
            ],
        )
        .unwrap_err();
        assert_eq!(
            r.error,
            ChainError::OutsideMemory {
                index: 1,
                addr: 0x1f000,
                len: 0x2000
            }
        );
        assert_eq!(r.status_addr, Some(GuestAddress(0x5000)));
        let r = parse_chain(
            &m,
            &[(0x1000, 16, true), (0x2000, 16, false), (0x5000, 4, true)],
        )
        .unwrap_err();
        assert_eq!(r.error, ChainError::ReadableAfterWritable { index: 1 });
        assert_eq!(r.status_addr, Some(GuestAddress(0x5003)));
        let r = parse_chain(&m, &[(0x1000, 16, false)]).unwrap_err();
        assert_eq!((r.error, r.status_addr), (ChainError::NoStatus, None));
    }
}
