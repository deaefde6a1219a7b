//! The fuzz entry for virtio-net: arbitrary bytes become guest memory holding a descriptor
//! table, an avail ring and frame data for one queue; the handler serves it as the tx and as
//! the rx queue and must not panic, hang or touch memory outside the guest. Used by
//! `fuzz/fuzz_targets/net.rs` and by a unit test over seeded pseudo-random inputs.

use std::sync::Arc;

use kiln_net::{port_pair, FramePort};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::device::NetDeviceConfig;
use super::handler::NetHandler;

const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// Byte 0 steers the shape: bit 0 EVENT_IDX, bits 1-3 the queue size (2..=256), bit 4 pulls
/// descriptor addresses and lengths into guest memory, bit 5 keeps the avail index
/// plausible, bit 6 legacy (10-byte) headers. The rest is copied to guest address 0.
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    let Some((&ctl, image)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = image.len().min(MEM_SIZE);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return;
    }
    let qsize: u16 = 1 << (((ctl >> 1) & 7) + 1);
    if ctl & 0x10 != 0 {
        for i in 0..u64::from(qsize) {
            let a = GuestAddress(DESC_TABLE + i * 16);
            let addr: u64 = mem.read_obj(a).unwrap_or(0);
            let len: u32 = mem.read_obj(a.unchecked_add(8)).unwrap_or(0);
            let _ = mem.write_obj(0x3000 + addr % (MEM_SIZE as u64 - 0x3000), a);
            let _ = mem.write_obj(len % 0x2000, a.unchecked_add(8));
        }
    }
    if ctl & 0x20 != 0 {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap_or(0);
        let _ = mem.write_obj(idx % (qsize + 1), GuestAddress(AVAIL_RING + 2));
    }
    let Ok((dev, net)) = port_pair(8) else {
        return;
    };
    let mut handler = NetHandler::new(Arc::new(dev));
    let features = if ctl & 0x40 != 0 {
        0
    } else {
        NetDeviceConfig::new([2, 0, 0, 0, 0, 1]).features()
    };
    handler.set_acked_features(features);
    for len in [60usize, 1514, 14] {
        let _ = net.send(&vec![0x5a; len]);
    }
    let make_queue = || {
        let mut queue = Queue::new(256).ok()?;
        queue.set_size(qsize);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_event_idx(ctl & 1 != 0);
        queue.set_ready(true);
        Some(queue)
    };
    if let Some(mut q) = make_queue() {
        let _ = handler.process_tx(&mut q, &mem);
    }
    if let Some(mut q) = make_queue() {
        for _ in 0..2 {
            let _ = handler.process_rx(&mut q, &mem);
        }
    }
    let mut buf = [0u8; 2048];
    while let Ok(Some(_)) = net.recv(&mut buf) {}
}

#[cfg(test)]
mod tests {
    use super::fuzz_entry;

    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn fuzz_entry_survives_random_inputs() {
        let mut s = 0x6e65_7431_u64;
        for round in 0..400u64 {
            let len = (next(&mut s) % 0x4000) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next(&mut s) as u8).collect();
            if let Some(c) = data.first_mut() {
                *c = (round as u8) | 0x30;
            }
            for i in (14..len.min(0x1000)).step_by(16) {
                data[i] %= 8;
                if i + 1 < len {
                    data[i + 1] = 0;
                }
            }
            fuzz_entry(&data);
        }
        fuzz_entry(&[]);
        fuzz_entry(&[0xff]);
    }
}
