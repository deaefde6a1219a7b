//! Interop with the real qemu-img: everything kiln writes passes `qemu-img check` and
//! compares identical; everything qemu-img writes reads back byte-identical through kiln.

use std::path::Path;

use crate::common::*;
use kiln_disk::{
    convert, create, create_overlay, open, open_with_own_reader, BlockDevice, Compression,
    ConvertOptions, CreateOptions, Format, OpenOptions,
};

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).expect("read");
    v
}

#[test]
fn convert_outputs_pass_qemu_check_and_compare() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    let data = make_mixed_raw(&raw, 24 << 20, 7);
    let src = open(&raw, OpenOptions::read_only()).unwrap();
    let cases: &[(&str, Format, Option<Compression>, u64)] = &[
        ("plain.qcow2", Format::Qcow2, None, 65536),
        (
            "deflate.qcow2",
            Format::Qcow2,
            Some(Compression::DEFLATE),
            65536,
        ),
        (
            "deflate4k.qcow2",
            Format::Qcow2,
            Some(Compression::Deflate { level: 6 }),
            4096,
        ),
        ("zstd.qcow2", Format::Qcow2, Some(Compression::ZSTD), 65536),
        (
            "zstd2m.qcow2",
            Format::Qcow2,
            Some(Compression::ZSTD),
            2 << 20,
        ),
        ("plain512.qcow2", Format::Qcow2, None, 512),
        ("out.raw", Format::Raw, None, 65536),
    ];
    for (name, format, compress, cs) in cases {
        let out = d.path().join(name);
        let opts = ConvertOptions {
            format: *format,
            compress: *compress,
            cluster_size: *cs,
            threads: 2,
            ..Default::default()
        };
        convert(src.as_ref(), &out, &opts).unwrap();
        if *format == Format::Qcow2 {
            assert_clean(&out);
        }
        assert_same(&raw, &out);
        let back = open(&out, OpenOptions::read_only()).unwrap();
        assert!(
            read_all(back.as_ref()) == data,
            "{name}: kiln reads back different data"
        );
        let own = open_with_own_reader(&out).unwrap();
        assert!(read_all(own.as_ref()) == data, "{name}: own reader differs");
    }
}

#[test]
fn overlay_writes_pass_qemu_check() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let mut model = make_mixed_raw(&base, 8 << 20, 3);
    // relative backing name
    create_overlay(d.path().join("mid.qcow2"), "base.raw", None).unwrap();
    // absolute backing name, larger size
    create(
        d.path().join("top.qcow2"),
        &CreateOptions {
            backing: Some(d.path().join("mid.qcow2").to_str().unwrap().to_string()),
            size: Some(10 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    model.resize(10 << 20, 0);
    let top = open(d.path().join("top.qcow2"), OpenOptions::read_write()).unwrap();
    assert_eq!(top.size(), 10 << 20);
    let mut rng = Rng::new(99);
    for _ in 0..200 {
        let off = rng.below(10 << 20);
        let len = rng.below(200_000).min((10 << 20) - off);
        match rng.below(4) {
            0 | 1 => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                top.write_at(&b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            2 => {
                top.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                top.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
    top.flush().unwrap();
    assert!(read_all(top.as_ref()) == model);
    drop(top);
    assert_clean(&d.path().join("top.qcow2"));
    assert_clean(&d.path().join("mid.qcow2"));
    let expect = d.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    assert_same(&expect, &d.path().join("top.qcow2"));
    // flatten the chain
    let flat = d.path().join("flat.qcow2");
    let top = open(d.path().join("top.qcow2"), OpenOptions::read_only()).unwrap();
    convert(
        top.as_ref(),
        &flat,
        &ConvertOptions {
            compress: Some(Compression::DEFLATE),
            ..Default::default()
        },
    )
    .unwrap();
    assert_clean(&flat);
    assert_same(&expect, &flat);
    let info = qemu_img(&["info", flat.to_str().unwrap()]);
    assert!(
        !info.contains("backing file"),
        "flattened image still has a backing file: {info}"
    );
}

fn qemu_made_reads_identical(d: &Path, create_args: &[&str], name: &str) {
    let raw = d.join(format!("{name}.raw"));
    let data = make_mixed_raw(&raw, 6 << 20, name.len() as u64 + 11);
    let img = d.join(format!("{name}.qcow2"));
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(create_args);
    let (r, i) = (
        raw.to_str().unwrap().to_string(),
        img.to_str().unwrap().to_string(),
    );
    args.push(&r);
    args.push(&i);
    qemu_img(&args);
    let dev = open(&img, OpenOptions::read_only()).unwrap();
    assert!(read_all(dev.as_ref()) == data, "{name}: imago path differs");
    let own = open_with_own_reader(&img).unwrap();
    assert!(read_all(own.as_ref()) == data, "{name}: own reader differs");
}

#[test]
fn qemu_img_images_read_back_identical() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("v2", &["-o", "compat=0.10"]),
        ("v3", &["-o", "compat=1.1"]),
        ("c4k", &["-o", "cluster_size=4096"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("compressed", &["-c"]),
        ("compressed_v2", &["-c", "-o", "compat=0.10"]),
        ("compressed_4k", &["-c", "-o", "cluster_size=4096"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
    ];
    for (name, args) in cases {
        qemu_made_reads_identical(d.path(), args, name);
    }
}

#[test]
fn qemu_backing_chain_and_snapshot_read_and_write() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let raw = d.path().join("base.raw");
    let data = make_mixed_raw(&raw, 4 << 20, 5);
    qemu_img(&["convert", "-O", "qcow2", &p("base.raw"), &p("base.qcow2")]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p("ov.qcow2"),
    ]);
    // An internal snapshot of the overlay after some writes (made by qemu-io through qemu-img).
    qemu_img(&["snapshot", "-c", "snap1", &p("ov.qcow2")]);
    let dev = open(p("ov.qcow2"), OpenOptions::read_write()).unwrap();
    assert!(read_all(dev.as_ref()) == data);
    let mut model = data.clone();
    let mut rng = Rng::new(4);
    for _ in 0..50 {
        let off = rng.below(4 << 20);
        let len = rng.below(100_000).min((4 << 20) - off);
        let mut b = vec![0u8; len as usize];
        rng.fill(&mut b);
        dev.write_at(&b, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&b);
    }
    dev.flush().unwrap();
    drop(dev);
    assert_clean(&d.path().join("ov.qcow2"));
    let expect = d.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    assert_same(&expect, &d.path().join("ov.qcow2"));
    // The snapshot still holds the old content.
    qemu_img(&["snapshot", "-a", "snap1", &p("ov.qcow2")]);
    assert_clean(&d.path().join("ov.qcow2"));
    assert_same(&raw, &d.path().join("ov.qcow2"));
}
