//! A mock guest driver's queue plumbing for kiln's vsock device, on virtio-queue's test
//! utilities: ready queues, descriptor chains as a Linux guest lays them out (a header
//! descriptor, then a data descriptor), and guest packet headers. Shared by the vsock queue
//! tests and the `vsock_bench` benchmark (which includes this file by path).
#![allow(dead_code)]

use kiln_vmm::devices::vsock::protocol::{Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The mock guest's CID.
pub const CID: u64 = 3;
/// Both queues' size.
pub const QSIZE: u16 = 256;
/// The receive buffer space the mock guest advertises.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// A ready queue over `vq`'s descriptor table and avail ring, with the used ring placed
/// 8 KiB after the table. (`MockSplitQueue::create` places the used ring `len` bytes after
/// the avail ring's entries instead of `2 * len`, so with a real queue size the device's
/// used entries would land on the driver's avail entries.)
pub fn make_queue(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> (Queue, GuestAddress) {
    use virtio_queue::QueueT;
    let used = vq.desc_table_addr().unchecked_add(0x2000);
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.try_set_desc_table_address(vq.desc_table_addr())
        .expect("desc");
    q.try_set_avail_ring_address(vq.avail_addr())
        .expect("avail");
    q.try_set_used_ring_address(used).expect("used");
    q.set_ready(true);
    (q, used)
}

/// Writes a chain's descriptors at table index `first` and publishes its head in the avail
/// ring. (`MockSplitQueue::add_desc_chains` does not wrap the ring index, so a long run would
/// write past the avail ring.)
pub fn add_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    first: u16,
) {
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table()
            .store(first + i as u16, *d)
            .expect("store descriptor");
    }
    let idx_at = vq.avail_addr().unchecked_add(2);
    let idx: u16 = mem.read_obj(idx_at).expect("avail idx");
    let slot = vq
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(idx % QSIZE));
    mem.write_obj(first, slot).expect("avail slot");
    mem.write_obj(idx.wrapping_add(1), idx_at)
        .expect("avail idx");
}

/// A stream packet header from the mock guest to the host.
pub fn guest_hdr(op: u16, src_port: u32, dst_port: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt,
    }
}

/// A TX chain at table index `first`: the header at `hdr`, then `data_len` bytes at `data`
/// when there are any (a packet without payload is one descriptor).
pub fn tx_chain(hdr: u64, data: u64, data_len: u32, first: u16) -> Vec<RawDescriptor> {
    if data_len == 0 {
        return vec![RawDescriptor::from(SplitDescriptor::new(
            hdr,
            HEADER_SIZE as u32,
            0,
            0,
        ))];
    }
    vec![
        RawDescriptor::from(SplitDescriptor::new(
            hdr,
            HEADER_SIZE as u32,
            VRING_DESC_F_NEXT as u16,
            first + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(data, data_len, 0, 0)),
    ]
}

/// An RX buffer chain at table index `first`: device-writable room for a header at `hdr`,
/// then `data_len` bytes at `data`.
pub fn rx_chain(hdr: u64, data: u64, data_len: u32, first: u16) -> [RawDescriptor; 2] {
    [
        RawDescriptor::from(SplitDescriptor::new(
            hdr,
            HEADER_SIZE as u32,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            first + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            data,
            data_len,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ]
}
