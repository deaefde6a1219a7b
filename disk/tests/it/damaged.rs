//! A damaged qcow2 (cut short, or an L2 entry pointing far past the end of the file) is an
//! error for every reader, never zeroes: imago reads past the end of a file as zeroes, and
//! `convert` used to write those zeroes out and succeed.

use crate::common;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kiln_disk::{
    check, convert, create, open, open_with_own_reader, ConvertOptions, CreateOptions, Format,
    OpenOptions,
};

const SIZE: u64 = 8 << 20;

/// A qcow2 (64 KiB clusters) with every cluster written with non-zero data, and that data.
fn full_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("full.qcow2");
    create(
        &p,
        &CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let mut data = vec![0u8; SIZE as usize];
    let mut rng = common::Rng::new(7);
    rng.fill(&mut data);
    for b in data.iter_mut().filter(|b| **b == 0) {
        *b = 1;
    }
    let dev = open(&p, OpenOptions::read_write()).unwrap();
    dev.write_at(&data, 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    (p, data)
}

/// Every way kiln reads an image must fail on `p` with an error naming the damage; returns
/// the open error's text.
fn every_reader_fails(p: &Path) -> String {
    let mut all = vec![0u8; SIZE as usize];
    let msg = match open(p, OpenOptions::read_only()) {
        Err(e) => e.to_string(),
        Ok(dev) => match dev.read_at(&mut all, 0) {
            Err(e) => e.to_string(),
            Ok(()) => panic!(
                "{} read without error (zeroes in {} clusters)",
                p.display(),
                all.chunks(65536)
                    .filter(|c| c.iter().all(|&b| b == 0))
                    .count()
            ),
        },
    };
    if let Ok(dev) = open_with_own_reader(p) {
        assert!(
            dev.read_at(&mut all, 0).is_err(),
            "kiln's own reader read {} without error",
            p.display()
        );
    }
    msg
}

/// `convert` of the damaged image fails and leaves nothing in the output folder.
fn convert_fails_without_output(p: &Path) {
    let out = tempfile::tempdir().unwrap();
    for format in [Format::Qcow2, Format::Raw] {
        let dst = out.path().join("out.img");
        let r = open(p, OpenOptions::read_only()).and_then(|dev| {
            convert(
                dev.as_ref(),
                &dst,
                &ConvertOptions {
                    format,
                    ..Default::default()
                },
            )
        });
        assert!(
            r.is_err(),
            "convert of {} to {format:?} succeeded",
            p.display()
        );
        let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
        assert!(left.is_empty(), "convert left {left:?}");
    }
}

#[test]
fn image_cut_in_half_is_an_error_not_zeroes() {
    let d = tempfile::tempdir().unwrap();
    let (p, _) = full_image(d.path());
    let len = std::fs::metadata(&p).unwrap().len();
    // The header, L1, refcounts and L2 tables are at the front: cutting the file in half
    // keeps the metadata readable and loses the last half of the data clusters.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = every_reader_fails(&p);
    assert!(
        e.contains(&p.display().to_string())
            && e.contains("guest offset")
            && e.contains("past the end"),
        "{e}"
    );
    assert!(check(&p).unwrap().corruptions > 0);
    convert_fails_without_output(&p);
}

#[test]
fn l2_entry_a_tebibyte_past_the_end_is_an_error_not_zeroes() {
    let d = tempfile::tempdir().unwrap();
    let (p, data) = full_image(d.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1_off = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1_off).unwrap();
    let l2_off = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 5 now claims to live 1 TiB past the end of the file.
    f.read_exact_at(&mut b, l2_off + 5 * 8).unwrap();
    let orig = b;
    let bad = (1u64 << 40) | (1 << 63);
    f.write_all_at(&bad.to_be_bytes(), l2_off + 5 * 8).unwrap();
    let e = every_reader_fails(&p);
    assert!(
        e.contains(&p.display().to_string()) && e.contains("guest offset 0x50000"),
        "{e}"
    );
    assert!(check(&p).unwrap().corruptions > 0);
    convert_fails_without_output(&p);

    // Put the entry back: the image reads as written again, so the failure above was the
    // entry, not an image kiln cannot read at all.
    f.write_all_at(&orig, l2_off + 5 * 8).unwrap();
    let dev = open(&p, OpenOptions::read_only()).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == data, "restored image reads back differently");
}
