//! Guest data lands where the chain says, on real kiln-disk devices: reads and writes whose
//! data is split over many descriptors (odd lengths, out of address order, one crossing
//! from one guest memory region into the next) at offsets spanning qcow2 clusters of every
//! kind: data, unallocated over a backing file, unallocated with no data, zero-flagged over
//! backing data, deflate and zstd compressed; and raw. Every data descriptor sits between
//! guard bytes, so a byte written to the wrong piece or past one fails the test; the
//! reference is the device's own plain `read_at`.

use std::sync::Arc;

use kiln_disk::test_images::{converted, every_kind_chain, Rng, CS, SIZE};
use kiln_disk::{open, BlockDevice, Compression, Format, OpenOptions};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BlockDeviceConfig, BlockHandler, BlockOptions, IoPool};

type Mem = GuestMemoryMmap<()>;

const GUARD: u8 = 0xee;
/// Guest memory: two regions, host-separate, meeting at `REGION`.
const REGION: u64 = 0x20_0000;
/// Data descriptors are placed from here on (the queue's rings sit below).
const DATA_AREA: u64 = 0x10_0000;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap()
}

/// One request's data pieces: (guest address, length) in stream order.
struct Pieces(Vec<(u64, u32)>);

/// Cut `len` bytes into pieces of odd sizes (some crossing a page), place them, most with
/// gaps, in the data area in shuffled order, one of them across the region boundary, and fill
/// the gaps around them with guard bytes.
fn place(mem: &Mem, rng: &mut Rng, len: u32) -> Pieces {
    let mut lens = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match rng.below(4) {
            0 => 512,
            1 => 4096,
            2 => 1536,
            _ => 512 * (1 + rng.below(20) as u32),
        }
        .min(left);
        lens.push(n);
        left -= n;
    }
    // Addresses in shuffled slot order, the first piece straddling the boundary.
    let mut order: Vec<usize> = (0..lens.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut addrs = vec![0u64; lens.len()];
    let mut at = REGION - u64::from(lens[order[0]]) / 2;
    for &i in &order {
        addrs[i] = at;
        // Some pieces touch the one before (the parser merges those into one segment).
        at += u64::from(lens[i])
            + match rng.below(3) {
                0 => 0,
                _ => 1 + rng.below(64),
            };
        if at >= REGION * 2 - 0x10_0000 {
            at = DATA_AREA;
        }
    }
    // Guards: the whole data area, then the pieces themselves are written over by the test.
    mem.write_slice(
        &vec![GUARD; (2 * REGION - DATA_AREA) as usize],
        GuestAddress(DATA_AREA),
    )
    .unwrap();
    Pieces(addrs.into_iter().zip(lens).collect())
}

/// A request chain at `head_addr`: 16-byte header, the data pieces, a status byte.
fn chain(mem: &Mem, rtype: u32, sector: u64, pieces: &Pieces, hdr: u64) -> Vec<RawDescriptor> {
    mem.write_obj(rtype, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let data_flags = if rtype == VIRTIO_BLK_T_IN { n | w } else { n };
    let mut d = vec![RawDescriptor::from(SplitDescriptor::new(hdr, 16, n, 1))];
    for (i, &(addr, len)) in pieces.0.iter().enumerate() {
        d.push(RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            data_flags,
            i as u16 + 2,
        )));
    }
    d.push(RawDescriptor::from(SplitDescriptor::new(
        hdr + 0x100,
        1,
        w,
        0,
    )));
    d
}

fn status(mem: &Mem, hdr: u64) -> u8 {
    mem.read_obj(GuestAddress(hdr + 0x100)).unwrap()
}

/// The guest bytes of the pieces, concatenated, after checking every guard byte.
fn gather(mem: &Mem, pieces: &Pieces) -> Vec<u8> {
    let mut area = vec![0u8; (2 * REGION - DATA_AREA) as usize];
    mem.read_slice(&mut area, GuestAddress(DATA_AREA)).unwrap();
    let mut inside = vec![false; area.len()];
    let mut out = Vec::new();
    for &(addr, len) in &pieces.0 {
        let s = (addr - DATA_AREA) as usize;
        inside[s..s + len as usize].fill(true);
        out.extend_from_slice(&area[s..s + len as usize]);
    }
    if let Some(i) = (0..area.len()).find(|&i| !inside[i] && area[i] != GUARD) {
        panic!(
            "guest byte {:#x} outside every data descriptor changed",
            DATA_AREA + i as u64
        );
    }
    out
}

fn run(h: &mut BlockHandler, mem: &Mem, descs: &[RawDescriptor]) {
    let vq = MockSplitQueue::new(mem, 256);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    h.process_queue(&mut q, mem).unwrap();
}

/// Random sector-aligned requests (up to 40 KiB, so up to 11 clusters) and a few fixed
/// ones over the interesting boundaries.
fn requests(rng: &mut Rng) -> Vec<(u64, u32)> {
    let mut v = vec![
        (0, (SIZE / 4) as u32),
        (19 * CS, 12 * CS as u32),
        (34 * CS + 512, 5 * CS as u32),
        (SIZE - 10 * CS, 10 * CS as u32),
    ];
    for _ in 0..30 {
        let sector = rng.below(SIZE / 512 - 1);
        let max = (SIZE - sector * 512).min(40 * 1024) / 512;
        v.push((sector * 512, 512 * (1 + rng.below(max) as u32)));
    }
    v
}

fn check_reads(name: &str, disk: Arc<dyn BlockDevice>, rng: &mut Rng) {
    let mem = memory();
    let config = BlockDeviceConfig::new(disk.size(), true, &BlockOptions::default());
    let mut h = BlockHandler::new(disk.clone(), config);
    for (off, len) in requests(rng) {
        let pieces = place(&mem, rng, len);
        run(
            &mut h,
            &mem,
            &chain(&mem, VIRTIO_BLK_T_IN, off / 512, &pieces, 0x8000),
        );
        assert_eq!(
            status(&mem, 0x8000),
            VIRTIO_BLK_S_OK as u8,
            "{name}: read {len} at {off}"
        );
        let mut want = vec![0u8; len as usize];
        disk.read_at(&mut want, off).unwrap();
        assert!(
            gather(&mem, &pieces) == want,
            "{name}: read {len} at {off}: wrong data"
        );
    }
}

#[test]
fn scattered_reads_land_in_place_on_every_kind_of_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (top, _) = every_kind_chain(dir.path(), &mut rng);
    let chain_dev = open(&top, OpenOptions::read_only()).unwrap();
    let (deflate, zstd, raw) = (
        dir.path().join("d.qcow2"),
        dir.path().join("z.qcow2"),
        dir.path().join("r.raw"),
    );
    converted(
        chain_dev.as_ref(),
        &deflate,
        Format::Qcow2,
        Some(Compression::DEFLATE),
    );
    converted(
        chain_dev.as_ref(),
        &zstd,
        Format::Qcow2,
        Some(Compression::ZSTD),
    );
    converted(chain_dev.as_ref(), &raw, Format::Raw, None);
    check_reads("qcow2 chain", chain_dev, &mut rng);
    for (name, p) in [("deflate", &deflate), ("zstd", &zstd), ("raw", &raw)] {
        check_reads(name, open(p, OpenOptions::read_only()).unwrap(), &mut rng);
    }
}

#[test]
fn scattered_writes_land_in_place_on_a_qcow2_chain_and_raw() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    let (top, _) = every_kind_chain(dir.path(), &mut rng);
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0x5a; SIZE as usize]).unwrap();
    for p in [&top, &raw] {
        let disk = open(p, OpenOptions::read_write()).unwrap();
        let mem = memory();
        let config = BlockDeviceConfig::new(disk.size(), false, &BlockOptions::default());
        let mut h = BlockHandler::new(disk.clone(), config);
        let mut model = vec![0u8; SIZE as usize];
        disk.read_at(&mut model, 0).unwrap();
        for (off, len) in requests(&mut rng) {
            let pieces = place(&mem, &mut rng, len);
            let data = rng.bytes(len as usize);
            let mut at = 0;
            for &(addr, n) in &pieces.0 {
                mem.write_slice(&data[at..at + n as usize], GuestAddress(addr))
                    .unwrap();
                at += n as usize;
            }
            run(
                &mut h,
                &mem,
                &chain(&mem, VIRTIO_BLK_T_OUT, off / 512, &pieces, 0x8000),
            );
            assert_eq!(
                status(&mem, 0x8000),
                VIRTIO_BLK_S_OK as u8,
                "{p:?}: write at {off}"
            );
            model[off as usize..off as usize + len as usize].copy_from_slice(&data);
            let mut back = vec![0u8; SIZE as usize];
            disk.read_at(&mut back, 0).unwrap();
            assert!(back == model, "{p:?}: after writing {len} at {off}");
        }
    }
}

#[test]
fn reads_in_flight_on_the_pool_land_in_their_own_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x7777_1111_2222_3333);
    let (top, _) = every_kind_chain(dir.path(), &mut rng);
    let disk = open(&top, OpenOptions::read_only()).unwrap();
    let mem = Arc::new(memory());
    let config = BlockDeviceConfig::new(disk.size(), true, &BlockOptions::default());
    let mut h = BlockHandler::new(disk.clone(), config);
    let mut pool = IoPool::new(&h);
    // Eight reads in one batch, each in its own 64 KiB slot of the data area, 1 KiB
    // descriptors in reverse address order.
    let vq = MockSplitQueue::new(&*mem, 256);
    mem.write_slice(
        &vec![GUARD; (2 * REGION - DATA_AREA) as usize],
        GuestAddress(DATA_AREA),
    )
    .unwrap();
    let mut descs = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        let len = 16 * 1024u32;
        let slot = DATA_AREA + i * 0x1_0000;
        let pieces = Pieces((0..16).rev().map(|k| (slot + k * 1030, 1024)).collect());
        let off = rng.below(SIZE / 512 - 32) * 512;
        let hdr = 0x8000 + i * 0x200;
        let mut c = chain(&mem, VIRTIO_BLK_T_IN, off / 512, &pieces, hdr);
        let first = descs.len() as u16;
        for d in c.iter_mut() {
            let sd = SplitDescriptor::from(*d);
            let next = if sd.flags() & VRING_DESC_F_NEXT as u16 != 0 {
                sd.next() + first
            } else {
                0
            };
            *d = RawDescriptor::from(SplitDescriptor::new(
                sd.addr().0,
                sd.len(),
                sd.flags(),
                next,
            ));
        }
        descs.extend(c);
        reqs.push((hdr, off, len, pieces));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    pool.serve(&mut h, &mut q, &mem, &mut || {}).unwrap();
    let mut all = Pieces(Vec::new());
    for (hdr, off, len, pieces) in &reqs {
        assert_eq!(status(&mem, *hdr), VIRTIO_BLK_S_OK as u8);
        let mut want = vec![0u8; *len as usize];
        disk.read_at(&mut want, *off).unwrap();
        assert!(gather_only(&mem, pieces) == want, "read {len} at {off}");
        all.0.extend(&pieces.0);
    }
    gather(&mem, &all);
}

/// The guest bytes of the pieces, concatenated (guards checked separately).
fn gather_only(mem: &Mem, pieces: &Pieces) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len) in &pieces.0 {
        let mut b = vec![0u8; len as usize];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        out.extend(b);
    }
    out
}
