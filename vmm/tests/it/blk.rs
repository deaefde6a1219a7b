//! virtio-blk request logic against mock guest memory (virtio-queue's test utilities): each
//! request type, each failure status, and malformed chains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_disk::{BlockDevice, BlockError, BlockResult};
use kiln_vmm::devices::block::{BlockDeviceConfig, BlockHandler, BlockOptions};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x20_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// An in-memory disk that counts flushes.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    ro: bool,
    flushes: AtomicUsize,
    discards: AtomicUsize,
}

impl MemDisk {
    fn new(size: usize, ro: bool) -> Arc<Self> {
        Arc::new(MemDisk {
            data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()),
            ro,
            flushes: AtomicUsize::new(0),
            discards: AtomicUsize::new(0),
        })
    }
    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }
    fn range(&self, offset: u64, len: u64) -> BlockResult<std::ops::Range<usize>> {
        let size = self.size();
        kiln_disk::check_range(size, offset, len)?;
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        if self.ro {
            return Err(BlockError::ReadOnly);
        }
        let r = self.range(offset, buf.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

/// A descriptor: (address, length, flags without NEXT).
type D = (u64, u32, u16);

struct Rig {
    mem: GuestMemoryMmap,
    disk: Arc<MemDisk>,
    handler: BlockHandler,
}

impl Rig {
    fn new(disk_size: usize, ro: bool) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let disk = MemDisk::new(disk_size, ro);
        let opts = BlockOptions {
            read_only: false,
            serial: "kiln-test-disk".into(),
            num_queues: 1,
        };
        let config = BlockDeviceConfig::new(disk.size(), ro, &opts);
        let handler = BlockHandler::new(disk.clone(), config);
        Rig { mem, disk, handler }
    }

    fn header(&self, addr: u64, rtype: u32, sector: u64) {
        self.mem
            .write_obj(rtype.to_le(), GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    /// Put `chains` on a fresh queue of 16 entries, run the handler, return the used ring
    /// entries (head, len) and whether a notification was due.
    fn run(&mut self, chains: &[Vec<D>]) -> Vec<(u32, u32)> {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let mut descs = Vec::new();
        for chain in chains {
            let base = descs.len() as u16;
            for (i, (addr, len, flags)) in chain.iter().enumerate() {
                let last = i == chain.len() - 1;
                let (f, next) = if last {
                    (*flags, 0)
                } else {
                    (*flags | VRING_DESC_F_NEXT as u16, base + i as u16 + 1)
                };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    *addr, *len, f, next,
                )));
            }
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        self.handler.process_queue(&mut q, &self.mem).unwrap();
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const ST: u64 = 0x1f_0000;

#[test]
fn write_then_read_multi_descriptor() {
    let mut r = Rig::new(1 << 20, false);
    let pattern: Vec<u8> = (0..3 * 512).map(|i| (i * 7 % 256) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    r.header(HDR, VIRTIO_BLK_T_OUT, 8);
    r.mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    // Data split unevenly across three descriptors.
    let used = r.run(&[vec![
        (HDR, 16, 0),
        (DATA, 100, 0),
        (DATA + 100, 1000, 0),
        (DATA + 1100, 436, 0),
        (ST, 1, W),
    ]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.disk.bytes(8 * 512, 3 * 512), pattern);

    // Read it back into two buffers, with the status byte sharing the last descriptor.
    let mut r2 = r;
    r2.header(HDR, VIRTIO_BLK_T_IN, 8);
    let out = DATA + 0x1_0000;
    let used = r2.run(&[vec![(HDR, 16, 0), (out, 512, W), (out + 512, 1025, W)]]);
    assert_eq!(used, vec![(0, 3 * 512 + 1)]);
    assert_eq!(r2.status(out + 1536), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 1536];
    r2.mem.read_slice(&mut got, GuestAddress(out)).unwrap();
    assert_eq!(got, pattern);
}

#[test]
fn header_split_across_descriptors() {
    let mut r = Rig::new(1 << 20, false);
    r.header(HDR, VIRTIO_BLK_T_IN, 1);
    let used = r.run(&[vec![
        (HDR, 5, 0),
        (HDR + 5, 11, 0),
        (DATA, 512, W),
        (ST, 1, W),
    ]]);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, r.disk.bytes(512, 512));
}

#[test]
fn several_requests_in_flight_complete_in_order() {
    let mut r = Rig::new(1 << 20, false);
    let mut chains = Vec::new();
    for i in 0..4u64 {
        let h = HDR + i * 0x100;
        r.header(h, VIRTIO_BLK_T_IN, i * 2);
        chains.push(vec![
            (h, 16, 0),
            (DATA + i * 0x1000, 1024, W),
            (ST + i, 1, W),
        ]);
    }
    let used = r.run(&chains);
    assert_eq!(used, vec![(0, 1025), (3, 1025), (6, 1025), (9, 1025)]);
    for i in 0..4u64 {
        assert_eq!(r.status(ST + i), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 1024];
        r.mem
            .read_slice(&mut got, GuestAddress(DATA + i * 0x1000))
            .unwrap();
        assert_eq!(got, r.disk.bytes(i as usize * 1024, 1024));
    }
}

#[test]
fn flush_get_id_discard_write_zeroes() {
    let mut r = Rig::new(1 << 20, false);
    r.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[vec![(HDR, 16, 0), (ST, 1, W)]]), vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.disk.flushes.load(Ordering::SeqCst), 1);

    r.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.run(&[vec![(HDR, 16, 0), (DATA, 20, W), (ST, 1, W)]]),
        vec![(0, 21)]
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..14], b"kiln-test-disk");
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);

    // Two discard ranges.
    r.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend(n.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v
    };
    let mut list = seg(2, 2, 0);
    list.extend(seg(10, 1, 0));
    r.mem.write_slice(&list, GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.run(&[vec![(HDR, 16, 0), (DATA, 32, 0), (ST, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    assert!(r.disk.bytes(1024, 1024).iter().all(|b| *b == 0));
    assert!(r.disk.bytes(5120, 512).iter().all(|b| *b == 0));
    assert_ne!(r.disk.bytes(2048, 512), vec![0u8; 512]);
    assert_eq!(r.disk.discards.load(Ordering::SeqCst), 2);

    // Write zeroes with the unmap flag is allowed; discard with it is not.
    r.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    r.mem
        .write_slice(
            &seg(20, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA),
        )
        .unwrap();
    assert_eq!(
        r.run(&[vec![(HDR, 16, 0), (DATA, 16, 0), (ST, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    assert!(r.disk.bytes(20 * 512, 2048).iter().all(|b| *b == 0));

    r.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    r.mem
        .write_slice(
            &seg(40, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA),
        )
        .unwrap();
    r.run(&[vec![(HDR, 16, 0), (DATA, 16, 0), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_UNSUPP as u8);
    assert_ne!(r.disk.bytes(40 * 512, 512), vec![0u8; 512]);

    // A list whose second range is past the end changes nothing, not even the first range.
    let mut list = seg(50, 1, 0);
    list.extend(seg(1 << 40, 1, 0));
    r.mem.write_slice(&list, GuestAddress(DATA)).unwrap();
    r.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    r.run(&[vec![(HDR, 16, 0), (DATA, 32, 0), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);
    assert_ne!(r.disk.bytes(50 * 512, 512), vec![0u8; 512]);
}

#[test]
fn write_through_without_flush_feature() {
    let mut r = Rig::new(1 << 20, false);
    r.handler.set_acked_features(0);
    r.header(HDR, VIRTIO_BLK_T_OUT, 0);
    r.run(&[vec![(HDR, 16, 0), (DATA, 512, 0), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.disk.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn read_only_disk() {
    let mut r = Rig::new(1 << 20, true);
    let before = r.disk.bytes(0, 512);
    r.header(HDR, VIRTIO_BLK_T_OUT, 0);
    r.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.run(&[vec![(HDR, 16, 0), (DATA, 512, 0), (ST, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.disk.bytes(0, 512), before);

    r.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    r.run(&[vec![(HDR, 16, 0), (DATA, 16, 0), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_UNSUPP as u8);

    // Reads still work.
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    r.run(&[vec![(HDR, 16, 0), (DATA, 512, W), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn failure_statuses() {
    let mut r = Rig::new(1 << 20, false);
    let cases: &[(u32, u64, u32, u8, &str)] = &[
        (
            VIRTIO_BLK_T_IN,
            2047,
            1024,
            VIRTIO_BLK_S_IOERR as u8,
            "read past the end",
        ),
        (
            VIRTIO_BLK_T_IN,
            u64::MAX / 4,
            512,
            VIRTIO_BLK_S_IOERR as u8,
            "sector overflow",
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            100,
            VIRTIO_BLK_S_IOERR as u8,
            "not a whole sector",
        ),
        (
            VIRTIO_BLK_T_OUT,
            2048,
            512,
            VIRTIO_BLK_S_IOERR as u8,
            "write past the end",
        ),
        (99, 0, 512, VIRTIO_BLK_S_UNSUPP as u8, "unknown type"),
        (
            VIRTIO_BLK_T_SCSI_CMD,
            0,
            512,
            VIRTIO_BLK_S_UNSUPP as u8,
            "scsi",
        ),
    ];
    for (rtype, sector, len, want, what) in cases {
        r.header(HDR, *rtype, *sector);
        r.mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
        let flags = if *rtype == VIRTIO_BLK_T_OUT { 0 } else { W };
        let used = r.run(&[vec![(HDR, 16, 0), (DATA, *len, flags), (ST, 1, W)]]);
        assert_eq!(used.len(), 1, "{what}");
        assert_eq!(r.status(ST), *want, "{what}");
    }
    // A header shorter than 16 bytes.
    r.run(&[vec![(HDR, 8, 0), (ST, 1, W)]]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn malformed_chains_are_refused_with_an_error_status() {
    let mut r = Rig::new(1 << 20, false);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let data_before = vec![0x77u8; 1024];
    let reset = |r: &Rig| {
        r.mem.write_obj(0xeeu8, GuestAddress(ST)).unwrap();
        r.mem.write_slice(&data_before, GuestAddress(DATA)).unwrap();
    };
    let untouched = |r: &Rig| {
        let mut d = vec![0u8; 1024];
        r.mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
        d == data_before
    };

    // Data buffer outside guest memory: refused whole, IOERR in the status byte.
    reset(&r);
    let used = r.run(&[vec![(HDR, 16, 0), (MEM as u64 - 256, 512, W), (ST, 1, W)]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);

    // Address that wraps around the 64-bit space.
    reset(&r);
    let used = r.run(&[vec![(HDR, 16, 0), (u64::MAX - 10, 512, W), (ST, 1, W)]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);

    // A readable descriptor after a writable one (wrong write flags): nothing is read into
    // the data buffer.
    reset(&r);
    let used = r.run(&[vec![
        (HDR, 16, 0),
        (DATA, 512, W),
        (DATA + 512, 512, 0),
        (ST, 1, W),
    ]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);
    assert!(untouched(&r));

    // Absurd length (near 4 GiB) inside the chain.
    reset(&r);
    let used = r.run(&[vec![(HDR, 16, 0), (DATA, u32::MAX - 100, W), (ST, 1, W)]]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_IOERR as u8);
    assert!(untouched(&r));

    // A chain past 4 GiB in total is cut by the chain iterator before its status
    // descriptor: completed with nothing written.
    reset(&r);
    let used = r.run(&[vec![(HDR, 16, 0), (DATA, u32::MAX - 16, W), (ST, 1, W)]]);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(r.status(ST), 0xee);
    assert!(untouched(&r));

    // No writable byte for the status at all: completed with nothing written.
    reset(&r);
    let used = r.run(&[vec![(HDR, 16, 0), (DATA, 512, 0)]]);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(r.status(ST), 0xee);

    // The status descriptor itself outside memory: nothing written anywhere.
    reset(&r);
    let used = r.run(&[vec![
        (HDR, 16, 0),
        (DATA, 512, W),
        (MEM as u64 + 4096, 1, W),
    ]]);
    assert_eq!(used, vec![(0, 0)]);
    assert!(untouched(&r));
}

#[test]
fn descriptor_loop_terminates() {
    let mut r = Rig::new(1 << 20, false);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&r.mem, 16);
    // 0 -> 1 -> 0 -> ... : a cycle of readable descriptors.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, VRING_DESC_F_NEXT as u16, 0)),
    ];
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    r.handler.process_queue(&mut q, &r.mem).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
}

#[test]
fn lying_avail_index_is_an_error_not_a_hang() {
    let mut r = Rig::new(1 << 20, false);
    let vq = MockSplitQueue::new(&r.mem, 16);
    vq.avail().idx().store(1000u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    assert!(r.handler.process_queue(&mut q, &r.mem).is_err());
    // Head index past the queue size.
    let vq = MockSplitQueue::new(&r.mem, 16);
    vq.avail().ring().ref_at(0).unwrap().store(500u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    let _ = r.handler.process_queue(&mut q, &r.mem);
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn indirect_table() {
    let mut r = Rig::new(1 << 20, false);
    r.header(HDR, VIRTIO_BLK_T_IN, 3);
    // The indirect table lives in guest memory at 0x18_0000.
    let table = 0x18_0000u64;
    let inner = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDescriptor::new(ST, 1, W, 0),
    ];
    for (i, d) in inner.iter().enumerate() {
        r.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let used = r.run(&[vec![(table, 48, VRING_DESC_F_INDIRECT as u16)]]);
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(r.status(ST), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, r.disk.bytes(3 * 512, 512));
}

#[test]
fn large_request_goes_through_bounded_chunks() {
    // 3 MiB read: more than one bounce-buffer chunk.
    let mut r = Rig::new(4 << 20, false);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    r.mem = mem;
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let big = 0x40_0000u64;
    let used = r.run(&[vec![(HDR, 16, 0), (big, 3 << 20, W), (ST, 1, W)]]);
    assert_eq!(used, vec![(0, (3 << 20) + 1)]);
    let mut got = vec![0u8; 3 << 20];
    r.mem.read_slice(&mut got, GuestAddress(big)).unwrap();
    assert_eq!(got, r.disk.bytes(0, 3 << 20));
}
