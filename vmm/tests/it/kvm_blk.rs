//! virtio-blk in a kiln VM: kiln's blk device logic (`VirtioBlock`, the same `BlockHandler`
//! the vhost-user backend serves to QEMU) behind kiln-vmm's virtio-mmio transport, driven
//! by a tiny guest driver (`kvm_support::virtio_guest`) that does the virtio handshake,
//! writes descriptor chains and avail entries into its own memory, notifies through
//! QueueNotify (an ioeventfd) and sleeps until the device's interrupt (an irqfd) says the
//! used ring moved.
//!
//! The checks are the ones `blk_qemu.rs` makes with the Linux driver: a pattern written to
//! a qcow2 opened by `kiln_disk::open` and read back, FLUSH, GET_ID, a read-only disk that
//! refuses writes, and afterwards `qemu-img check` and the content compared on the host.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::kvm_support::virtio_guest::{reg, Buf, Device, Script, VIRTIO_F_VERSION_1};
use crate::kvm_support::{finish_script, kvm_or_skip, log_warnings, start_script};
use kiln_disk::{BlockDevice, CreateOptions, Format, OpenOptions};
use kiln_e2e::image::checked_contents;
use kiln_vmm::devices::block::device::VIRTIO_ID_BLOCK;
use kiln_vmm::devices::block::BlockOptions;
use kiln_vmm::devices::block::VirtioBlock;

const DISK_SIZE: u64 = 8 << 20;
const SECTORS: u64 = DISK_SIZE / 512;
/// The pattern starts 4 KiB before the first 64 KiB cluster boundary and spans three
/// clusters.
const PATTERN_SECTOR: u64 = 120;
const PATTERN_LEN: usize = 128 << 10;
const SERIAL: &str = "kiln-kvm-blk0";
const RO_SERIAL: &str = "kiln-kvm-ro";
const RO_SIZE: usize = 1 << 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u64 = 0;
const S_IOERR: u64 = 1;
const S_UNSUPP: u64 = 2;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    kiln_e2e::pattern::pattern(seed, len)
}

fn header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn id_bytes(serial: &str) -> Vec<u8> {
    let mut id = serial.as_bytes().to_vec();
    id.resize(20, 0);
    id
}

/// The driver's part: both devices set up, then the requests, each result checked in the
/// guest.
fn script(pat: &[u8], ro_pat: &[u8]) -> Script {
    let mut s = Script::new(2);
    let rw = Device::new(0);
    let ro = Device::new(1);
    let mut q = s.virtq(rw, 0, 16);
    let mut rq = s.virtq(ro, 0, 16);
    let features = VIRTIO_F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_SEG_MAX;
    s.init_device(rw, VIRTIO_ID_BLOCK, features, features, 256, &[&q]);
    s.init_device(
        ro,
        VIRTIO_ID_BLOCK,
        VIRTIO_F_VERSION_1 | F_RO,
        VIRTIO_F_VERSION_1 | F_RO,
        256,
        &[&rq],
    );

    // What the writable disk's config space and features say.
    s.write(4, rw.reg(reg::DEVICE_FEATURES_SEL), 0, "features sel");
    s.expect_masked(4, rw.reg(reg::DEVICE_FEATURES), F_RO, 0, "rw disk: no RO");
    s.expect(4, rw.reg(reg::CONFIG), SECTORS, "capacity (low word)");
    s.expect(4, rw.reg(reg::CONFIG + 4), 0, "capacity (high word)");
    s.expect(4, rw.reg(reg::CONFIG + 0x14), 512, "blk_size");

    // Write the pattern (header, data in two descriptors, status).
    let data = s.place(pat);
    let half = (PATTERN_LEN / 2) as u32;
    let h = s.place(&header(T_OUT, PATTERN_SECTOR));
    let st = s.alloc(1, 1);
    s.write(1, st, 0xff, "status poison");
    s.submit(
        &mut q,
        &[
            Buf::R(h, 16),
            Buf::R(data, half),
            Buf::R(data + u64::from(half), half),
            Buf::W(st, 1),
        ],
        1,
        "write the pattern",
    );
    s.expect(1, st, S_OK, "write the pattern: status");

    // Read it back into other memory, split at an odd place, and compare.
    let back = s.alloc(PATTERN_LEN as u64, 4096);
    let split = 4608u32;
    let h = s.place(&header(T_IN, PATTERN_SECTOR));
    let st = s.alloc(1, 1);
    s.write(1, st, 0xff, "status poison");
    s.submit(
        &mut q,
        &[
            Buf::R(h, 16),
            Buf::W(back, split),
            Buf::W(back + u64::from(split), PATTERN_LEN as u32 - split),
            Buf::W(st, 1),
        ],
        PATTERN_LEN as u32 + 1,
        "read the pattern back",
    );
    s.expect(1, st, S_OK, "read back: status");
    s.compare(back, data, PATTERN_LEN as u64, "read back == written");

    // FLUSH and GET_ID in flight together, one notification; completed in order.
    let hf = s.place(&header(T_FLUSH, 0));
    let stf = s.alloc(1, 1);
    let hi = s.place(&header(T_GET_ID, 0));
    let id = s.alloc(20, 16);
    let sti = s.alloc(1, 1);
    s.write(1, stf, 0xff, "status poison");
    s.write(1, sti, 0xff, "status poison");
    let flush = s.add_chain(&mut q, &[Buf::R(hf, 16), Buf::W(stf, 1)]);
    let get_id = s.add_chain(&mut q, &[Buf::R(hi, 16), Buf::W(id, 20), Buf::W(sti, 1)]);
    s.kick(&q);
    s.wait_used(&mut q, 2, "flush + get-id");
    s.expect_used(&q, 2, flush, 1, "flush");
    s.expect_used(&q, 3, get_id, 21, "get-id");
    s.expect(1, stf, S_OK, "flush: status");
    s.expect(1, sti, S_OK, "get-id: status");
    s.compare_with(id, &id_bytes(SERIAL), "get-id: the serial");

    // A read past the end and an unknown request type get error statuses.
    let h = s.place(&header(T_IN, SECTORS - 1));
    let buf = s.alloc(1024, 16);
    let st = s.alloc(1, 1);
    s.submit(
        &mut q,
        &[Buf::R(h, 16), Buf::W(buf, 1024), Buf::W(st, 1)],
        1,
        "read past the end",
    );
    s.expect(1, st, S_IOERR, "read past the end: IOERR");
    let h = s.place(&header(0x55, 0));
    let st = s.alloc(1, 1);
    s.submit(&mut q, &[Buf::R(h, 16), Buf::W(st, 1)], 1, "unknown type");
    s.expect(1, st, S_UNSUPP, "unknown type: UNSUPP");
    s.expect_used_idx(&q, "rw disk");

    // The read-only disk refuses a write and serves a read of what the host put there.
    let h = s.place(&header(T_OUT, 0));
    let junk = s.place(&[0xa5; 512]);
    let st = s.alloc(1, 1);
    s.submit(
        &mut rq,
        &[Buf::R(h, 16), Buf::R(junk, 512), Buf::W(st, 1)],
        1,
        "write to the read-only disk",
    );
    s.expect(1, st, S_IOERR, "write to the read-only disk: IOERR");
    let h = s.place(&header(T_IN, 0));
    let rback = s.alloc(4096, 4096);
    let st = s.alloc(1, 1);
    s.submit(
        &mut rq,
        &[Buf::R(h, 16), Buf::W(rback, 4096), Buf::W(st, 1)],
        4097,
        "read the read-only disk",
    );
    s.expect(1, st, S_OK, "read-only read: status");
    s.compare_with(rback, &ro_pat[..4096], "read-only disk content");
    let h = s.place(&header(T_GET_ID, 0));
    let id = s.alloc(20, 16);
    let st = s.alloc(1, 1);
    s.submit(
        &mut rq,
        &[Buf::R(h, 16), Buf::W(id, 20), Buf::W(st, 1)],
        21,
        "read-only get-id",
    );
    s.compare_with(id, &id_bytes(RO_SERIAL), "read-only get-id: the serial");

    s.expect_interrupts(rw);
    s.expect_interrupts(ro);
    s.print("kiln-blk: ok\n");
    s.end();
    s
}

fn qemu_img_ok() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The image as the host sees it: `qemu-img check` passes and the content, converted to
/// raw by qemu-img, is the pattern where the guest wrote it and zeroes everywhere else.
fn check_image(img: &Path, pat: &[u8], dir: &Path) {
    let data = if qemu_img_ok() {
        checked_contents(img, dir).unwrap()
    } else {
        kiln_e2e::skip(
            "kiln_blk: qemu-img is not installed; checking the image with kiln-disk only",
        );
        let report = kiln_disk::check(img).unwrap();
        assert!(report.is_clean(), "kiln-disk check: {report:?}");
        let disk = kiln_disk::open(img, OpenOptions::read_only()).unwrap();
        let mut data = vec![0u8; DISK_SIZE as usize];
        disk.read_at(&mut data, 0).unwrap();
        data
    };
    assert_eq!(data.len() as u64, DISK_SIZE);
    let at = (PATTERN_SECTOR * 512) as usize;
    assert!(
        data[..at].iter().all(|b| *b == 0),
        "data before the pattern"
    );
    assert!(
        data[at..at + PATTERN_LEN] == *pat,
        "pattern differs on the host"
    );
    assert!(
        data[at + PATTERN_LEN..].iter().all(|b| *b == 0),
        "data after the pattern"
    );
}

#[test]
fn guest_driver_blk_pattern_flush_get_id_read_only() {
    if !kvm_or_skip("guest_driver_blk_pattern_flush_get_id_read_only") {
        return;
    }
    log_warnings();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    kiln_disk::create(
        &img,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(DISK_SIZE),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let ro_img = dir.path().join("ro.raw");
    let ro_pat = pattern(RO_SIZE, 0x0123_4567_89ab_cdef);
    std::fs::write(&ro_img, &ro_pat).unwrap();

    let disk: Arc<dyn BlockDevice> = kiln_disk::open(&img, OpenOptions::read_write()).unwrap();
    let ro_disk: Arc<dyn BlockDevice> = kiln_disk::open(&ro_img, OpenOptions::read_only()).unwrap();
    let pat = pattern(PATTERN_LEN, 0x2545_f491_4f6c_dd1d);
    let s = script(&pat, &ro_pat);
    let mut m = start_script(
        &s,
        vec![
            Box::new(VirtioBlock::new(
                disk.clone(),
                &BlockOptions {
                    read_only: false,
                    serial: SERIAL.into(),
                    num_queues: 1,
                },
            )),
            Box::new(VirtioBlock::new(
                ro_disk.clone(),
                &BlockOptions {
                    read_only: true,
                    serial: RO_SERIAL.into(),
                    num_queues: 1,
                },
            )),
        ],
    );
    let console = finish_script(&mut m, &s);
    assert_eq!(console, "kiln-blk: ok\n");
    {
        let t = m.transports()[0].lock().unwrap();
        assert!(t.is_activated());
        assert_eq!(t.interrupt().status(), 0, "the guest acknowledged");
    }
    drop(m);
    // The VM is gone, and with it the device's references to the disks.
    assert_eq!(
        Arc::strong_count(&disk),
        1,
        "the device still holds the disk"
    );
    disk.flush().unwrap();
    drop(disk);
    drop(ro_disk);
    check_image(&img, &pat, dir.path());
    assert!(
        std::fs::read(&ro_img).unwrap() == ro_pat,
        "the read-only image changed"
    );
}
