//! Vectored reads and writes land every byte in the right buffer, at the right place, on
//! every device and every kind of cluster: data, unallocated (backing or zeroes), zero-flag
//! over backing data, deflate and zstd compressed, and runs spanning all of them. The
//! buffers are pieces of odd sizes cut from one allocation with guard bytes between them, so
//! a byte that goes to the wrong piece or past one is caught.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::test_images::{converted, every_kind_chain, qcow2, Rng, CS, SIZE};
use crate::{open, open_with_own_reader, BlockDevice, Compression, Format, OpenOptions, RawDevice};

const GUARD: u8 = 0xee;

/// Piece lengths summing to `len`: odd sizes, zero-length ones, some crossing clusters.
fn pieces(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match rng.below(5) {
            0 => 1,
            1 => 0,
            2 => 511,
            3 => CS as usize + 3,
            _ => 1 + rng.below(3 * CS) as usize,
        }
        .min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// Offsets of each piece inside one buffer where pieces are separated by 1-3 guard bytes.
fn layout(rng: &mut Rng, lens: &[usize]) -> (Vec<usize>, usize) {
    let mut at = 1;
    let mut starts = Vec::new();
    for &n in lens {
        starts.push(at);
        at += n + 1 + rng.below(3) as usize;
    }
    (starts, at)
}

/// Read `len` bytes at `offset` through scattered pieces; check the guards; return the
/// concatenated pieces.
fn read_scattered(dev: &dyn BlockDevice, rng: &mut Rng, offset: u64, len: usize) -> Vec<u8> {
    let lens = pieces(rng, len);
    let (starts, total) = layout(rng, &lens);
    let mut buf = vec![GUARD; total];
    {
        let mut iov = Vec::new();
        let mut rest = &mut buf[..];
        let mut consumed = 0;
        for (&s, &n) in starts.iter().zip(&lens) {
            let (_, tail) = rest.split_at_mut(s - consumed);
            let (piece, tail) = tail.split_at_mut(n);
            iov.push(IoSliceMut::new(piece));
            rest = tail;
            consumed = s + n;
        }
        dev.read_vectored_at(&mut iov, offset)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
    }
    let mut out = Vec::with_capacity(len);
    let mut prev_end = 0;
    for (&s, &n) in starts.iter().zip(&lens) {
        assert!(
            buf[prev_end..s].iter().all(|&b| b == GUARD),
            "a guard byte before piece at {s} changed (read {len} at {offset})"
        );
        out.extend_from_slice(&buf[s..s + n]);
        prev_end = s + n;
    }
    assert!(buf[prev_end..].iter().all(|&b| b == GUARD));
    out
}

/// Write `data` at `offset` through scattered pieces.
fn write_scattered(dev: &dyn BlockDevice, rng: &mut Rng, offset: u64, data: &[u8]) {
    let lens = pieces(rng, data.len());
    let mut iov = Vec::new();
    let mut at = 0;
    for n in lens {
        iov.push(IoSlice::new(&data[at..at + n]));
        at += n;
    }
    dev.write_vectored_at(&iov, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", data.len()));
}

/// Random ranges (many crossing clusters and region kinds) plus the whole disk.
fn check_reads(name: &str, dev: &dyn BlockDevice, model: &[u8], rng: &mut Rng) {
    let whole = read_scattered(dev, rng, 0, model.len());
    assert!(whole == model, "{name}: whole-disk vectored read differs");
    for _ in 0..150 {
        let offset = rng.below(SIZE);
        let len = rng.below((SIZE - offset).min(12 * CS)) as usize + 1;
        let got = read_scattered(dev, rng, offset, len);
        let want = &model[offset as usize..offset as usize + len];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{name}: read {len} at {offset}: first difference at disk byte {}",
                offset as usize + at
            );
        }
    }
}

#[test]
fn vectored_reads_land_in_place_on_every_device_and_cluster_kind() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (top, model) = every_kind_chain(dir.path(), &mut rng);
    let imago = open(&top, OpenOptions::read_only()).unwrap();
    check_reads("imago chain", imago.as_ref(), &model, &mut rng);
    let own = open_with_own_reader(&top).unwrap();
    check_reads("own reader chain", own.as_ref(), &model, &mut rng);

    let (deflate, zstd, raw) = (
        dir.path().join("deflate.qcow2"),
        dir.path().join("zstd.qcow2"),
        dir.path().join("flat.raw"),
    );
    converted(
        imago.as_ref(),
        &deflate,
        Format::Qcow2,
        Some(Compression::DEFLATE),
    );
    converted(
        imago.as_ref(),
        &zstd,
        Format::Qcow2,
        Some(Compression::ZSTD),
    );
    converted(imago.as_ref(), &raw, Format::Raw, None);
    let d = open(&deflate, OpenOptions::read_only()).unwrap();
    check_reads("imago deflate", d.as_ref(), &model, &mut rng);
    let d = open_with_own_reader(&deflate).unwrap();
    check_reads("own reader deflate", d.as_ref(), &model, &mut rng);
    let z = open(&zstd, OpenOptions::read_only()).unwrap();
    check_reads("zstd", z.as_ref(), &model, &mut rng);
    let r = RawDevice::new(std::fs::File::open(&raw).unwrap(), true).unwrap();
    check_reads("raw", &r, &model, &mut rng);
}

#[test]
fn vectored_writes_land_in_place_on_qcow2_chains_and_raw() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (top, mut model) = every_kind_chain(dir.path(), &mut rng);
    let raw_path = dir.path().join("flat.raw");
    std::fs::write(&raw_path, &model).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw_path)
        .unwrap();
    let raw = RawDevice::new(f, false).unwrap();
    {
        let t = open(&top, OpenOptions::read_write()).unwrap();
        // Over data, unallocated-with-backing, zero-flagged and unallocated-without-data
        // clusters, and runs crossing all of them.
        let mut ranges = vec![
            (0, SIZE),
            (20 * CS - 5, 12 * CS),
            (34 * CS + 1, 5 * CS),
            (52 * CS - 1, 10 * CS),
        ];
        for _ in 0..40 {
            let off = rng.below(SIZE);
            ranges.push((off, rng.below((SIZE - off).min(9 * CS)) + 1));
        }
        for (i, (off, len)) in ranges.into_iter().enumerate() {
            if i == 0 {
                // Leave most of the chain's structure alone: only the first range is the
                // whole disk, and it goes to raw alone.
                let data = rng.bytes(len as usize);
                write_scattered(&raw, &mut rng, off, &data);
                let mut back = vec![0u8; len as usize];
                raw.read_at(&mut back, off).unwrap();
                assert!(back == data, "raw whole-disk vectored write");
                raw.write_at(&model, 0).unwrap();
                continue;
            }
            let data = rng.bytes(len as usize);
            write_scattered(t.as_ref(), &mut rng, off, &data);
            write_scattered(&raw, &mut rng, off, &data);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        let mut back = vec![0u8; SIZE as usize];
        t.read_at(&mut back, 0).unwrap();
        assert!(back == model, "qcow2 chain after vectored writes");
        raw.read_at(&mut back, 0).unwrap();
        assert!(back == model, "raw after vectored writes");
        t.flush().unwrap();
    }
    // An independent implementation agrees with what landed in the file.
    let own: Arc<dyn BlockDevice> = open_with_own_reader(&top).unwrap();
    check_reads("own reader after writes", own.as_ref(), &model, &mut rng);
}

#[test]
fn vectored_requests_past_the_end_or_to_read_only_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.raw");
    std::fs::write(&p, vec![1u8; 8192]).unwrap();
    let r = RawDevice::new(std::fs::File::open(&p).unwrap(), true).unwrap();
    let mut a = [0u8; 4096];
    let mut b = [0u8; 4097];
    let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
    assert!(matches!(
        r.read_vectored_at(&mut iov, 0),
        Err(crate::BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.write_vectored_at(&[IoSlice::new(&[0u8; 2]), IoSlice::new(&[0u8; 2])], 0),
        Err(crate::BlockError::ReadOnly)
    ));
    let q = dir.path().join("q.qcow2");
    qcow2(&q, None);
    let own = open_with_own_reader(&q).unwrap();
    let mut a = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut [])];
    assert!(own.read_vectored_at(&mut iov, SIZE - 4095).is_err());
}
