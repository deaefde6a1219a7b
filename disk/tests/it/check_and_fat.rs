//! `check` agrees with qemu-img on clean and damaged images; FAT images pass fsck.fat.

use std::os::unix::fs::FileExt;
use std::process::Command;

use crate::common::*;
use kiln_disk::{
    check, convert, create_cidata, create_floppy, open, Compression, ConvertOptions, FatFile,
    OpenOptions,
};

#[test]
fn check_clean_on_kiln_and_qemu_images() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("a.raw");
    make_mixed_raw(&raw, 8 << 20, 21);
    let src = open(&raw, OpenOptions::read_only()).unwrap();
    let out = d.path().join("c.qcow2");
    convert(
        src.as_ref(),
        &out,
        &ConvertOptions {
            compress: Some(Compression::DEFLATE),
            ..Default::default()
        },
    )
    .unwrap();
    let r = check(&out).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let q = d.path().join("q.qcow2");
    let (rs, qs) = (raw.to_str().unwrap(), q.to_str().unwrap());
    qemu_img(&["convert", "-c", "-O", "qcow2", rs, qs]);
    qemu_img(&["snapshot", "-c", "s1", qs]);
    let dev = open(&q, OpenOptions::read_write()).unwrap();
    dev.write_at(&[9u8; 100_000], 70_000).unwrap();
    drop(dev);
    assert_clean(&q);
    let r = check(&q).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(r.allocated_clusters > 0);
}

#[test]
fn check_finds_leaks_and_corruption_like_qemu() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("a.raw");
    make_mixed_raw(&raw, 4 << 20, 5);
    let src = open(&raw, OpenOptions::read_only()).unwrap();
    let img = d.path().join("c.qcow2");
    convert(src.as_ref(), &img, &ConvertOptions::default()).unwrap();
    // Find the refcount block (first reftable entry) and the first data cluster's refcount.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 48).unwrap();
    let rt = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, rt).unwrap();
    let rb = u64::from_be_bytes(b);
    // Cluster 1 holds data (the writer appends data right after the header).
    f.write_all_at(&0u16.to_be_bytes(), rb + 2).unwrap();
    let r = check(&img).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    let q = Command::new("qemu-img")
        .args(["check"])
        .arg(&img)
        .status()
        .unwrap();
    assert_eq!(q.code(), Some(2), "qemu-img agrees it is corrupt");
    // Restore, then leak a cluster: bump refcount of the cluster past the end of data.
    f.write_all_at(&1u16.to_be_bytes(), rb + 2).unwrap();
    assert!(check(&img).unwrap().is_clean());
    let len = f.metadata().unwrap().len();
    f.set_len(len + 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), rb + 2 * (len / 65536))
        .unwrap();
    let r = check(&img).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
    let q = Command::new("qemu-img")
        .args(["check"])
        .arg(&img)
        .status()
        .unwrap();
    assert_eq!(q.code(), Some(3), "qemu-img agrees it leaks");
}

fn fsck_fat(path: &std::path::Path) -> bool {
    match Command::new("fsck.fat")
        .args(["-n", "-v"])
        .arg(path)
        .output()
    {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.status.success(), "fsck.fat {}: {text}", path.display());
            true
        }
        Err(_) => {
            kiln_e2e::skip("fsck.fat not installed (Debian package dosfstools)");
            false
        }
    }
}

fn read_back(path: &std::path::Path, name: &str) -> Vec<u8> {
    use hadris_fat::sync::{FatVolume, FatVolumeReadExt};
    let fs = FatVolume::open(std::fs::File::open(path).unwrap()).unwrap();
    let root = fs.root_dir();
    let entry = root
        .find(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} missing"));
    let mut r = fs.read_file(&entry).unwrap();
    let mut out = vec![0u8; entry.len() as usize];
    let mut got = 0;
    while got < out.len() {
        let n = r.read(&mut out[got..]).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    out.truncate(got);
    out
}

#[test]
fn cidata_seed_passes_fsck_and_has_label_and_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("seed.img");
    let ud = b"#cloud-config\nruncmd:\n  - echo hi\n".to_vec();
    create_cidata(&p, &ud, b"instance-id: kiln\n", Some(b"version: 2\n")).unwrap();
    if fsck_fat(&p) {
        let label = Command::new("fatlabel").arg(&p).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&label.stdout).trim().to_lowercase(),
            "cidata"
        );
    }
    assert_eq!(read_back(&p, "user-data"), ud);
    assert_eq!(read_back(&p, "network-config"), b"version: 2\n");
}

#[test]
fn floppy_is_1440k_with_long_names() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("floppy.img");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let files = vec![
        FatFile::new("autounattend.xml", b"<unattend/>".to_vec()),
        FatFile::new("a rather long file name.ps1", big.clone()),
    ];
    create_floppy(&p, "KILN", &files).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1_474_560);
    fsck_fat(&p);
    assert_eq!(read_back(&p, "a rather long file name.ps1"), big);
    assert_eq!(read_back(&p, "autounattend.xml"), b"<unattend/>");
    // Too much data is refused up front.
    let e = create_floppy(&p, "KILN", &[FatFile::new("x", vec![1u8; 2 << 20])]).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    let e = create_floppy(&p, "KILN", &[FatFile::new("a/b", vec![])]).unwrap_err();
    assert!(e.to_string().contains("invalid file name"), "{e}");
}
