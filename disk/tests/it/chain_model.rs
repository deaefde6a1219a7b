//! Property test: random writes, discards, zero-writes and flushes on the top of a three-deep
//! backing chain (raw <- qcow2 <- qcow2), checked against an in-memory model after every
//! sequence, then `qemu-img check` and `qemu-img compare`. Plus concurrent writers.

use std::sync::Arc;

use crate::common::*;
// Named, as proptest's prelude brings a `Rng` trait too.
use crate::common::Rng;
use kiln_disk::{create, create_overlay, open, BlockDevice, CreateOptions, OpenOptions};
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets cluster around boundaries (4 KiB clusters in the middle layer, 64 KiB on top).
    let off = prop_oneof![
        0..SIZE,
        (0..SIZE / 4096).prop_map(|c| c * 4096),
        (0..SIZE / 65536).prop_map(|c| c * 65536)
    ];
    let len = prop_oneof![1..600u64, 1..200_000u64, Just(65536u64), Just(4096u64)];
    prop_oneof![
        5 => (off.clone(), len.clone(), any::<u64>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (off.clone(), len.clone()).prop_map(|(off, len)| Op::Zero { off, len }),
        2 => (off, len).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn clamp(off: u64, len: u64) -> (u64, u64) {
    (off, len.min(SIZE - off))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn chain_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let have_qemu = have_qemu_img();
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        let mut model = make_mixed_raw(&base, SIZE, 77);
        create(d.path().join("mid.qcow2"), &CreateOptions { backing: Some("base.raw".into()), cluster_size: 4096, ..Default::default() }).unwrap();
        {
            let mid = open(d.path().join("mid.qcow2"), OpenOptions::read_write()).unwrap();
            let mut rng = Rng::new(5);
            for _ in 0..20 {
                let (off, len) = clamp(rng.below(SIZE), rng.below(50_000) + 1);
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                mid.write_at(&b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
        }
        create_overlay(d.path().join("top.qcow2"), d.path().join("mid.qcow2"), None).unwrap();
        let top_path = d.path().join("top.qcow2");
        let mut top = open(&top_path, OpenOptions::read_write()).unwrap();
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let (off, len) = clamp(off, len);
                    let mut b = vec![0u8; len as usize];
                    Rng::new(seed | 1).fill(&mut b);
                    top.write_at(&b, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&b);
                }
                Op::Zero { off, len } => {
                    let (off, len) = clamp(off, len);
                    top.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    let (off, len) = clamp(off, len);
                    top.discard(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Flush => top.flush().unwrap(),
                Op::Reopen => {
                    drop(top);
                    top = open(&top_path, OpenOptions::read_write()).unwrap();
                }
            }
        }
        let mut got = vec![0u8; SIZE as usize];
        top.read_at(&mut got, 0).unwrap();
        prop_assert!(got == model, "kiln read differs from the model");
        drop(top);
        if have_qemu {
            assert_clean(&top_path);
            let expect = d.path().join("expect.raw");
            std::fs::write(&expect, &model).unwrap();
            assert_same(&expect, &top_path);
        }
    }
}

#[test]
fn concurrent_writers_on_one_device() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.qcow2");
    create(
        &p,
        &CreateOptions {
            size: Some(16 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let dev: Arc<dyn BlockDevice> = open(&p, OpenOptions::read_write()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = Arc::clone(&dev);
            s.spawn(move || {
                let mut rng = Rng::new(t + 1);
                for i in 0..64u64 {
                    // Each thread owns interleaved 16 KiB slots.
                    let slot = i * 4 + t;
                    let mut b = vec![0u8; 16384];
                    rng.fill(&mut b);
                    dev.write_at(&b, slot * 16384 * 4).unwrap();
                    if i % 8 == 0 {
                        dev.flush().unwrap();
                    }
                }
            });
        }
    });
    for t in 0..4u64 {
        let mut rng = Rng::new(t + 1);
        for i in 0..64u64 {
            let slot = i * 4 + t;
            let mut want = vec![0u8; 16384];
            rng.fill(&mut want);
            let mut got = vec![0u8; 16384];
            dev.read_at(&mut got, slot * 16384 * 4).unwrap();
            assert!(got == want, "thread {t} slot {i}");
        }
    }
    drop(dev);
    if have_qemu_img() {
        assert_clean(&p);
    }
}
