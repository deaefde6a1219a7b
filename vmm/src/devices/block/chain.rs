//! A descriptor chain seen as two byte streams: what the driver gave the device to read,
//! followed by what it gave the device to write.
//!
//! virtio 1.x lets a driver split a request's header, data and status across descriptors any
//! way it likes, so the handler never assumes one descriptor per part: it reads the header
//! from the first 16 readable bytes and writes the status into the last writable byte.
//! Every descriptor is checked against guest memory here, before any I/O, so a request that
//! names memory the guest does not have is refused whole instead of half done.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

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
        let descs: Vec<_> = chain.by_ref().collect();
        let mem = chain.memory();
        // Where an error status can still go: the last byte of the last descriptor, if that
        // descriptor is device-writable and the byte is guest memory.
        let status_addr = descs.last().and_then(|d| {
            let a = d.addr().0.checked_add(u64::from(d.len()).checked_sub(1)?)?;
            (d.is_write_only() && mem.check_range(GuestAddress(a), 1, Permissions::Write))
                .then_some(GuestAddress(a))
        });
        let refuse = |error| Refused { error, status_addr };
        let mut layout = ChainLayout::default();
        for (index, d) in descs.iter().enumerate() {
            if d.len() == 0 {
                continue;
            }
            // The device reads readable descriptors and writes writable ones: check for that.
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(refuse(ChainError::OutsideMemory {
                    index,
                    addr: d.addr().0,
                    len: d.len(),
                }));
            }
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                layout.writable.push(seg);
            } else if layout.writable.is_empty() {
                layout.readable.push(seg);
            } else {
                return Err(refuse(ChainError::ReadableAfterWritable { index }));
            }
        }
        if layout.writable.is_empty() {
            return Err(refuse(ChainError::NoStatus));
        }
        Ok(layout)
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
