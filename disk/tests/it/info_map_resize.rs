//! `info`, `map` and `resize` on a small chain.

use crate::common::*;
use kiln_disk::{
    create_overlay, info, map, open, resize, BackingPolicy, ExtentKind, Format, OpenOptions,
};

#[test]
fn info_map_and_resize_on_a_chain() {
    let d = tempfile::tempdir().unwrap();
    let mut base = vec![0u8; 4 << 20];
    base[..65536].fill(3);
    std::fs::write(d.path().join("base.raw"), &base).unwrap();
    let ov = d.path().join("ov.qcow2");
    create_overlay(&ov, "base.raw", None).unwrap();
    {
        let dev = open(&ov, OpenOptions::read_write()).unwrap();
        dev.write_at(&[9u8; 65536], 1 << 20).unwrap();
        dev.write_zeroes(2 << 20, 65536).unwrap();
    }

    let i = info(&ov, &BackingPolicy::Follow).unwrap();
    assert_eq!(i.top.format, Format::Qcow2);
    assert_eq!(i.top.virtual_size, 4 << 20);
    assert_eq!(i.top.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(i.chain.len(), 2);
    assert_eq!(i.chain[1].format, Format::Raw);
    assert!(i.top.allocated_bytes > 0);
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["chain"][1]["format"], "raw");

    let m = map(&ov, &BackingPolicy::Follow).unwrap();
    let at = |off: u64| {
        m.iter()
            .find(|e| e.start <= off && off < e.start + e.length)
            .unwrap()
            .clone()
    };
    // The raw base answers everywhere the overlay does not.
    assert_eq!((at(0).kind, at(0).depth), (ExtentKind::Data, Some(1)));
    assert_eq!(
        (at(1 << 20).kind, at(1 << 20).depth),
        (ExtentKind::Data, Some(0))
    );
    assert_eq!(
        (at(2 << 20).kind, at(2 << 20).depth),
        (ExtentKind::Zero, Some(0))
    );
    assert_eq!(m.iter().map(|e| e.length).sum::<u64>(), 4 << 20);

    resize(&ov, 8 << 20).unwrap();
    let dev = open(&ov, OpenOptions::read_only()).unwrap();
    assert_eq!(dev.size(), 8 << 20);
    let mut b = vec![1u8; 65536];
    dev.read_at(&mut b, 6 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0), "grown area reads as zeroes");
    dev.read_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 9));
    drop(dev);
    let e = resize(&ov, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("shrinking"), "{e}");
    if have_qemu_img() {
        assert_clean(&ov);
        let out = qemu_img(&["info", "--output=json", ov.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(8 << 20));
    }
}
