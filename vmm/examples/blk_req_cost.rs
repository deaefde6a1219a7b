//! The backend's own CPU cost per virtio-blk request, for deterministic counting under
//! callgrind (no guest, no QEMU, no timing): a mock queue in host memory, requests shaped
//! like the Linux driver's (a 16-byte header, the data in scattered 4 KiB pages, a status
//! byte), served by `BlockHandler` against a fully allocated kiln qcow2 (64 KiB clusters).
//!
//! `cargo build --release -p kiln-vmm --example blk_req_cost`, then
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/blk_req_cost MODE N`
//! for two values of N; the difference of the instruction counts over the difference of N is
//! the per-request cost (setup cancels). MODE: `read` / `write` (512 KiB in 128 pages),
//! `read4k` (one page). The kernel's page-cache copy is not counted: callgrind sees user
//! space only, which is where the backend's own overhead is.

use std::sync::Arc;

use kiln_disk::{create, open, BlockDevice, CreateOptions, OpenOptions};
use kiln_vmm::devices::block::{BlockDeviceConfig, BlockHandler, BlockOptions};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok())) {
        (Some(m), Some(n)) => (m.clone(), n),
        _ => {
            eprintln!("usage: blk_req_cost read|write|read4k N");
            std::process::exit(2);
        }
    };
    let (rtype, pages) = match mode.as_str() {
        "read" => (VIRTIO_BLK_T_IN, 128u64),
        "write" => (VIRTIO_BLK_T_OUT, 128),
        "read4k" => (VIRTIO_BLK_T_IN, 1),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cost.qcow2");
    create(
        &path,
        &CreateOptions {
            size: Some(DISK),
            ..Default::default()
        },
    )
    .expect("create");
    let disk: Arc<dyn BlockDevice> = open(&path, OpenOptions::read_write()).expect("open");
    // Allocate every cluster, so reads and writes go to data clusters (write-over shape).
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..DISK >> 20 {
        disk.write_at(&chunk, i << 20).expect("fill");
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
    let config = BlockDeviceConfig::new(DISK, false, &BlockOptions::default());
    let mut h = BlockHandler::new(disk, config);
    let (nf, wf) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let data_flags = if rtype == VIRTIO_BLK_T_IN {
        nf | wf
    } else {
        nf
    };
    for i in 0..n {
        let sector = (i * pages * 8) % (DISK / 512 - pages * 8);
        let hdr = 0x10_0000u64;
        mem.write_obj(rtype, GuestAddress(hdr)).unwrap();
        mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(hdr, 16, nf, 1))];
        for p in 0..pages {
            // Pages of a guest buffer are rarely adjacent: every other page.
            let addr = 0x20_0000 + p * 0x2000;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                4096,
                data_flags,
                p as u16 + 2,
            )));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            hdr + 0x100,
            1,
            wf,
            0,
        )));
        let vq = MockSplitQueue::new(&mem, 256);
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        h.process_queue(&mut q, &mem).expect("queue");
        let status: u8 = mem.read_obj(GuestAddress(hdr + 0x100)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }
    println!("{n} {mode} requests served");
}
