//! Bad images get a clear error naming the problem: never a panic, a hang, or an allocation
//! sized by the file's claims.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kiln_disk::{
    check, create, create_overlay, info, open, BackingPolicy, CreateOptions, OpenOptions,
};

fn good(dir: &Path) -> PathBuf {
    let p = dir.join("good.qcow2");
    create(
        &p,
        &CreateOptions {
            size: Some(8 << 20),
            cluster_size: 65536,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = open(&p, OpenOptions::read_write()).unwrap();
    dev.write_at(&vec![0x5a; 300_000], 100_000).unwrap();
    drop(dev);
    p
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn err_of(p: &Path) -> String {
    match open(p, OpenOptions::read_only()) {
        Ok(dev) => {
            let mut b = vec![0u8; 65536];
            match dev.read_at(&mut b, 131072) {
                Ok(()) => panic!("{} opened and read without error", p.display()),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_image() {
    let d = tempfile::tempdir().unwrap();
    let p = good(d.path());
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let e = err_of(&p);
    assert!(
        e.contains("past the end") || e.contains("end of the file"),
        "{e}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(40)
        .unwrap();
    let e = err_of(&p);
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn l1_offset_past_end() {
    let d = tempfile::tempdir().unwrap();
    let p = good(d.path());
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    let e = err_of(&p);
    assert!(e.contains("L1 table") && e.contains("past the end"), "{e}");
}

#[test]
fn l2_offset_past_end() {
    let d = tempfile::tempdir().unwrap();
    let p = good(d.path());
    let f = std::fs::File::open(&p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    patch(&p, l1, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    let e = err_of(&p);
    assert!(!e.is_empty());
    // kiln's own check names it precisely.
    let r = check(&p).unwrap();
    assert!(r.corruptions > 0);
    assert!(
        r.messages.iter().any(|m| m.contains("past the end")),
        "{:?}",
        r.messages
    );
}

#[test]
fn absurd_sizes() {
    let d = tempfile::tempdir().unwrap();
    let p = good(d.path());
    patch(&p, 24, &u64::MAX.to_be_bytes());
    let e = err_of(&p);
    assert!(e.contains("virtual size"), "{e}");
    let p = good(d.path());
    patch(&p, 36, &u32::MAX.to_be_bytes()); // l1_size
    let e = err_of(&p);
    assert!(e.contains("L1 table"), "{e}");
    let p = good(d.path());
    patch(&p, 56, &u32::MAX.to_be_bytes()); // refcount_table_clusters
    let e = err_of(&p);
    assert!(e.contains("refcount table"), "{e}");
    let p = good(d.path());
    patch(&p, 20, &40u32.to_be_bytes()); // cluster_bits
    let e = err_of(&p);
    assert!(e.contains("cluster_bits"), "{e}");
}

#[test]
fn refcount_table_pointing_at_header_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let p = good(d.path());
    let f = std::fs::File::open(&p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 48).unwrap();
    let rt = u64::from_be_bytes(b);
    // The first refcount block "is" the header cluster: a loop of metadata onto itself.
    patch(&p, rt, &0u64.to_be_bytes());
    patch(&p, rt, &65536u64.to_be_bytes());
    let r = check(&p).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
}

#[test]
fn backing_loops_and_missing_backing() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    create_overlay(d.path().join("a.qcow2"), "base.raw", None).unwrap();
    create_overlay(d.path().join("b.qcow2"), "a.qcow2", None).unwrap();
    // Rewrite a's backing name to point at b: a -> b -> a. Same length names.
    let a = d.path().join("a.qcow2");
    let bytes = std::fs::read(&a).unwrap();
    let at = bytes.windows(8).position(|w| w == b"base.raw").unwrap();
    patch(&a, at as u64, b"b.qcow2\0");
    patch(&a, 16, &7u32.to_be_bytes());
    let e = open(d.path().join("b.qcow2"), OpenOptions::read_only())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("loops"), "{e}");
    let e = info(d.path().join("b.qcow2"), &BackingPolicy::Follow)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("loops"), "{e}");
    // Self loop.
    patch(&a, at as u64, b"a.qcow2\0");
    let e = open(&a, OpenOptions::read_only())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("loops"), "{e}");
    // Missing backing file.
    patch(&a, at as u64, b"x.qcow2\0");
    let e = open(&a, OpenOptions::read_only())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("x.qcow2"), "{e}");
}

#[test]
fn deep_chain_is_followed_and_limited() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("l0.raw"), vec![7u8; 65536]).unwrap();
    let mut prev = "l0.raw".to_string();
    for i in 1..=20 {
        let name = format!("l{i}.qcow2");
        create_overlay(d.path().join(&name), &prev, None).unwrap();
        prev = name;
    }
    let dev = open(d.path().join(&prev), OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 65536];
    dev.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    let e = open(
        d.path().join(&prev),
        OpenOptions {
            max_chain_depth: 5,
            ..OpenOptions::read_only()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("deeper than 5"), "{e}");
}
