//! The fuzz entry for virtio-blk: arbitrary bytes become guest memory holding a descriptor
//! table, an avail ring and request data; the handler must serve it without panicking,
//! hanging or touching memory outside the guest. Used by `fuzz/fuzz_targets/blk.rs` and by a
//! unit test over seeded pseudo-random inputs.

use std::sync::{Arc, Mutex};

use kiln_disk::{BlockDevice, BlockError, BlockResult};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{BlockDeviceConfig, BlockOptions};
use super::handler::BlockHandler;
use super::scheduler::IoPool;

const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DISK_SIZE: usize = 0x8000;

/// A small in-memory disk for fuzzing.
struct FuzzDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl FuzzDisk {
    fn range(&self, offset: u64, len: u64) -> BlockResult<(usize, usize)> {
        let size = DISK_SIZE as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset as usize, end as usize)),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }
}

impl BlockDevice for FuzzDisk {
    fn size(&self) -> u64 {
        DISK_SIZE as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let (s, e) = self.range(offset, buf.len() as u64)?;
        let d = self
            .data
            .lock()
            .map_err(|_| BlockError::Corrupt("poisoned".into()))?;
        buf.copy_from_slice(&d[s..e]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        let (s, e) = self.range(offset, buf.len() as u64)?;
        let mut d = self
            .data
            .lock()
            .map_err(|_| BlockError::Corrupt("poisoned".into()))?;
        d[s..e].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        let (s, e) = self.range(offset, len)?;
        let mut d = self
            .data
            .lock()
            .map_err(|_| BlockError::Corrupt("poisoned".into()))?;
        d[s..e].fill(0);
        Ok(())
    }
}

/// Feed `data` to the virtio-blk handler as guest memory. Byte 0 steers the shape: bit 0
/// EVENT_IDX, bits 1-3 the queue size (2..=256), bit 6 a read-only disk, bit 7 FLUSH not
/// negotiated; bits 4-5: 00 raw memory, 01 descriptor addresses and lengths pulled into
/// guest memory, 10 the avail index kept plausible, 11 structured requests built from the
/// bytes (header, data segments, status, with sometimes-wrong flags, lengths and sectors),
/// so the request logic is reached and not just the ring checks. The rest is copied to
/// guest address 0: descriptor table at 0, avail ring at 0x1000, used ring at 0x2000,
/// payloads above.
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    let _ = run(data);
}

/// [`fuzz_entry`], returning how many chains reached the used ring with an OK status (so
/// the unit test can tell the inputs reach the request logic, not just the ring checks).
fn run(data: &[u8]) -> usize {
    let Some((&ctl, image)) = data.split_first() else {
        return 0;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return 0;
    };
    let n = image.len().min(MEM_SIZE);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return 0;
    }
    let qsize: u16 = 1 << (((ctl >> 1) & 7) + 1);
    if ctl & 0x30 == 0x30 {
        // Both steering bits: build plausible requests instead of reading raw memory.
        structured(&mem, qsize, image);
    } else if ctl & 0x10 != 0 {
        for i in 0..u64::from(qsize) {
            let a = GuestAddress(DESC_TABLE + i * 16);
            let addr: u64 = mem.read_obj(a).unwrap_or(0);
            let len: u32 = mem.read_obj(a.unchecked_add(8)).unwrap_or(0);
            let _ = mem.write_obj(0x3000 + addr % (MEM_SIZE as u64 - 0x3000), a);
            let _ = mem.write_obj(len % 0x2000, a.unchecked_add(8));
        }
    }
    if ctl & 0x30 == 0x20 {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap_or(0);
        let _ = mem.write_obj(idx % (qsize + 1), GuestAddress(AVAIL_RING + 2));
    }
    let disk = Arc::new(FuzzDisk {
        data: Mutex::new(vec![0xa5; DISK_SIZE]),
        read_only: ctl & 0x40 != 0,
    });
    let config = BlockDeviceConfig::new(DISK_SIZE as u64, disk.read_only, &BlockOptions::default());
    let mut handler = BlockHandler::new(disk, config);
    if ctl & 0x80 != 0 {
        handler.set_acked_features(0);
    }
    let Ok(mut queue) = Queue::new(256) else {
        return 0;
    };
    queue.set_size(qsize);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(ctl & 1 != 0);
    queue.set_ready(true);
    // Twice: the second pass sees the ring state the first one left.
    let mut ok = 0;
    let mem = Arc::new(mem);
    let mut pool = None;
    for _ in 0..2 {
        while let Ok(Some(chain)) = queue.iter(&*mem).map(|mut i| i.next()) {
            let head = chain.head_index();
            let done = handler.process_chain(chain, &*mem);
            if done.status == 0 && done.written > 0 {
                ok += 1;
            }
            if queue.add_used(&*mem, head, done.written).is_err() {
                break;
            }
        }
        // The queue walks the transports use: batch-notify (in process), signal-per-
        // completion, and requests side by side on the I/O workers (vhost-user).
        match image.len() % 3 {
            0 => {
                let _ = handler.process_queue(&mut queue, &*mem);
            }
            1 => {
                let _ = handler.process_queue_signalling(&mut queue, &*mem, &mut || {});
            }
            _ => {
                let pool = pool.get_or_insert_with(|| IoPool::new(&handler));
                let _ = pool.serve(&mut handler, &mut queue, &mem, &mut || {});
            }
        }
    }
    ok
}

/// Write chains shaped like virtio-blk requests into the descriptor table and avail ring,
/// each field taken from the next input byte.
fn structured(mem: &GuestMemoryMmap, qsize: u16, bytes: &[u8]) {
    use virtio_bindings::bindings::virtio_blk::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    const TYPES: [u32; 7] = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        99,
    ];
    let mut it = bytes.iter().copied();
    let mut desc = 0u16;
    let mut heap = 0x3000u64;
    let mut chains = 0u16;
    let put = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
        let a = GuestAddress(DESC_TABLE + u64::from(i) * 16);
        let _ = mem.write_obj(addr, a);
        let _ = mem.write_obj(len, a.unchecked_add(8));
        let _ = mem.write_obj(flags, a.unchecked_add(12));
        let _ = mem.write_obj(next, a.unchecked_add(14));
    };
    while let (Some(t), Some(sec), Some(shape)) = (it.next(), it.next(), it.next()) {
        let nseg = u16::from(shape & 3);
        if desc + nseg + 2 > qsize || heap + 0x2000 > MEM_SIZE as u64 {
            break;
        }
        let rtype = TYPES[usize::from(t) % TYPES.len()];
        let head = desc;
        let _ = mem.write_obj(rtype, GuestAddress(heap));
        let _ = mem.write_obj(u64::from(sec % 80), GuestAddress(heap + 8));
        put(desc, heap, 16, VRING_DESC_F_NEXT as u16, desc + 1);
        desc += 1;
        heap += 16;
        let device_writes = matches!(rtype, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        for _ in 0..nseg {
            let b = it.next().unwrap_or(0);
            let len = u32::from(b % 5) * 256;
            let mut w = device_writes;
            if b & 0x80 != 0 {
                w = !w; // a wrong write flag now and then
            }
            // Range lists for discard / write-zeroes: small sectors and counts.
            for k in 0..u64::from(len / 16) {
                let _ = mem.write_obj(
                    u64::from(it.next().unwrap_or(0) % 70),
                    GuestAddress(heap + k * 16),
                );
                let _ = mem.write_obj(
                    u32::from(it.next().unwrap_or(1) % 9),
                    GuestAddress(heap + k * 16 + 8),
                );
                let _ = mem.write_obj(0u32, GuestAddress(heap + k * 16 + 12));
            }
            let flags = VRING_DESC_F_NEXT as u16 | if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            put(desc, heap, len, flags, desc + 1);
            desc += 1;
            heap += u64::from(len);
        }
        put(desc, heap, 1, VRING_DESC_F_WRITE as u16, 0);
        desc += 1;
        heap += 1;
        let slot = AVAIL_RING + 4 + u64::from(chains % qsize) * 2;
        let _ = mem.write_obj(head, GuestAddress(slot));
        chains += 1;
    }
    let _ = mem.write_obj(chains, GuestAddress(AVAIL_RING + 2));
}

#[cfg(test)]
mod tests {
    use super::{fuzz_entry, run};

    /// xorshift64*: deterministic inputs without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn fuzz_entry_survives_random_inputs() {
        let mut s = 0x6b69_6c6e_u64;
        let mut ok = 0usize;
        for round in 0..400u64 {
            let len = (next(&mut s) % 0x4000) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next(&mut s) as u8).collect();
            if let Some(c) = data.first_mut() {
                // Half the rounds build structured requests (so the request logic is reached); the
                // other half cycle through every steering mode.
                *c = if round % 2 == 0 {
                    round as u8
                } else {
                    (round as u8) | 0x30
                };
            }
            // Small descriptor "next" fields keep chains inside the table more often.
            for i in (14..len.min(0x1000)).step_by(16) {
                data[i] %= 8;
                if i + 1 < len {
                    data[i + 1] = 0;
                }
            }
            ok += run(&data);
        }
        // Well-formed requests do turn up among the inputs.
        assert!(ok > 0, "no fuzz input reached a successful request");
        fuzz_entry(&[]);
        fuzz_entry(&[0xff]);
    }
}
