//! `kiln disk ...` driven like a user: hostile backing files refused, damaged images not
//! converted, one size parser, qemu-img's exit codes and JSON field names.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const SECRET: &[u8] = b"kiln-secret-bytes-that-must-not-leak";

struct Out {
    stdout: String,
    stderr: String,
    code: i32,
}

fn kiln(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln");
    let o = Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    };
    eprintln!(
        "$ kiln {}\n--- stdout\n{}--- stderr\n{}--- exit {}",
        args.join(" "),
        o.stdout,
        o.stderr,
        o.code
    );
    o
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        kiln_e2e::skip("qemu-img not installed (Debian package qemu-utils)");
    }
    ok
}

fn qemu_img(args: &[&str]) -> (String, i32) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 at `image` whose backing name is exactly `name` (raw backing), 64 KiB.
fn overlay_naming(image: &Path, name: &str) {
    let o = kiln(&["disk", "create", s(image), "64K", "-b", name, "-F", "raw"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

/// Every byte of every file under `dir`, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn hostile_backing_files_are_refused_by_info_map_and_convert() {
    let d = tempfile::tempdir().unwrap();
    let secret = d.path().join("secret.txt");
    std::fs::write(&secret, SECRET.repeat(1000)).unwrap();
    let deep = d.path().join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    let mut cases: Vec<(PathBuf, String)> = Vec::new();
    let abs = d.path().join("absolute.qcow2");
    overlay_naming(&abs, s(&secret));
    cases.push((abs, s(&secret).to_string()));
    let rel = deep.join("relative.qcow2");
    overlay_naming(&rel, "../../../secret.txt");
    cases.push((rel, "../../../secret.txt".into()));
    if Path::new("/etc/hostname").is_file() {
        let etc = d.path().join("etc.qcow2");
        overlay_naming(&etc, "/etc/hostname");
        cases.push((etc, "/etc/hostname".into()));
    } else {
        kiln_e2e::skip("the /etc/hostname case (no /etc/hostname here)");
    }
    let out = tempfile::tempdir().unwrap();
    for (image, name) in &cases {
        for args in [
            vec!["disk", "info", s(image)],
            vec!["disk", "info", "--output", "json", s(image)],
            vec!["disk", "map", s(image)],
            vec!["disk", "map", "--output", "json", s(image)],
            vec!["disk", "convert", s(image), s(&out.path().join("o.qcow2"))],
            vec![
                "disk",
                "convert",
                "-O",
                "raw",
                s(image),
                s(&out.path().join("o.raw")),
            ],
        ] {
            let o = kiln(&args);
            assert_ne!(o.code, 0, "{args:?} must fail");
            assert!(
                o.stderr.contains(s(image))
                    && o.stderr.contains(&format!("{name:?}"))
                    && o.stderr.contains("--allow-backing"),
                "names the image, the backing name and what to do: {}",
                o.stderr
            );
            assert!(!contains(o.stdout.as_bytes(), SECRET));
            assert!(!contains(o.stderr.as_bytes(), SECRET));
        }
        // Allowing another file is not allowing this one.
        let o = kiln(&[
            "disk",
            "convert",
            "--allow-backing",
            s(image),
            s(image),
            s(&out.path().join("o.qcow2")),
        ]);
        assert_ne!(o.code, 0);
    }
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "no output, not even a temporary"
    );
    assert!(!contains(&all_bytes(out.path()), SECRET));

    // Named explicitly (spelt differently), the backing file is read.
    let o = kiln(&[
        "disk",
        "convert",
        "-O",
        "raw",
        "--allow-backing",
        s(&deep.join("../../../secret.txt")),
        s(&cases[1].0),
        s(&out.path().join("ok.raw")),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(contains(
        &std::fs::read(out.path().join("ok.raw")).unwrap(),
        SECRET
    ));
}

/// A 4 MiB qcow2 full of non-zero data, written by `kiln disk convert` from a raw file.
fn full_qcow2(dir: &Path) -> PathBuf {
    let raw = dir.join("full.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&raw, data).unwrap();
    let q = dir.join("full.qcow2");
    let o = kiln(&["disk", "convert", "-q", s(&raw), s(&q)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    q
}

fn convert_fails_cleanly(img: &Path, offset_hint: &str) {
    let out = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "raw"] {
        let o = kiln(&[
            "disk",
            "convert",
            "-O",
            fmt,
            s(img),
            s(&out.path().join("o.img")),
        ]);
        assert_ne!(o.code, 0, "convert of a damaged image must fail");
        assert!(
            o.stderr.contains(s(img)) && o.stderr.contains(offset_hint),
            "names the image and the guest offset: {}",
            o.stderr
        );
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
    assert_eq!(kiln(&["disk", "check", s(img)]).code, 2);
}

#[test]
fn convert_of_a_damaged_image_fails_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let q = full_qcow2(d.path());
    // Written through kiln-disk's read-write path, so the metadata sits at the front and
    // cutting the file in half loses data clusters, not the tables.
    let cut = d.path().join("cut.qcow2");
    kiln_disk::create(
        &cut,
        &kiln_disk::CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let dev = kiln_disk::open(&cut, kiln_disk::OpenOptions::read_write()).unwrap();
    dev.write_at(&std::fs::read(d.path().join("full.raw")).unwrap(), 0)
        .unwrap();
    dev.flush().unwrap();
    drop(dev);
    let len = std::fs::metadata(&cut).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(len / 2).unwrap();
    convert_fails_cleanly(&cut, "guest offset 0x");

    let far = d.path().join("far.qcow2");
    std::fs::copy(&q, &far).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&far)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let at = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, at).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), l2 + 3 * 8)
        .unwrap();
    convert_fails_cleanly(&far, "guest offset 0x30000");
}

#[test]
fn sizes_and_relative_resize_follow_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("r.raw");
    let q = d.path().join("q.qcow2");
    for (img, fmt) in [(&raw, "raw"), (&q, "qcow2")] {
        assert_eq!(kiln(&["disk", "create", "-f", fmt, s(img), "4M"]).code, 0);
        assert_eq!(kiln(&["disk", "resize", s(img), "+10M"]).code, 0);
        assert_eq!(
            kiln_disk::virtual_size(img).unwrap(),
            14 << 20,
            "+10M of a 4 MiB {fmt} image"
        );
        assert_eq!(kiln(&["disk", "resize", s(img), "+1Gi"]).code, 0);
        assert_eq!(
            kiln_disk::virtual_size(img).unwrap(),
            (14 << 20) + (1 << 30)
        );
        assert_eq!(kiln(&["disk", "resize", s(img), "2GiB"]).code, 0);
        assert_eq!(kiln_disk::virtual_size(img).unwrap(), 2 << 30);
        // Shrinking is refused, relative or not, and the size stays.
        for arg in ["-1G", "1G", "-3G"] {
            let o = kiln(&["disk", "resize", s(img), arg]);
            assert_ne!(o.code, 0, "resize {arg}");
            assert_eq!(kiln_disk::virtual_size(img).unwrap(), 2 << 30);
        }
        let o = kiln(&["disk", "resize", s(img), "3GB"]);
        assert!(
            o.code != 0 && o.stderr.contains("ambiguous"),
            "{}",
            o.stderr
        );
    }
    let b = d.path().join("bytes.raw");
    assert_eq!(
        kiln(&["disk", "create", "-f", "raw", s(&b), "1048576"]).code,
        0
    );
    assert_eq!(kiln_disk::virtual_size(&b).unwrap(), 1 << 20);
    if have_qemu_img() {
        // The same spellings mean the same sizes to qemu-img.
        for (arg, want) in [("20G", 20u64 << 30), ("64K", 65536), ("3M", 3 << 20)] {
            let p = d.path().join(format!("q{arg}.qcow2"));
            qemu_img(&["create", "-q", "-f", "qcow2", s(&p), arg]);
            assert_eq!(kiln_disk::virtual_size(&p).unwrap(), want);
        }
    }
}

#[test]
fn check_exit_codes_are_qemu_imgs() {
    let d = tempfile::tempdir().unwrap();
    let q = full_qcow2(d.path());
    assert_eq!(kiln(&["disk", "check", s(&q)]).code, 0);
    // Raw has no checks: 63, as qemu-img.
    let o = kiln(&["disk", "check", s(&d.path().join("full.raw"))]);
    assert_eq!(o.code, 63, "{}", o.stderr);
    // The check cannot run at all (no such file): 1.
    assert_eq!(
        kiln(&["disk", "check", s(&d.path().join("missing.qcow2"))]).code,
        1
    );
    // A leak: an extra cluster at the end with a refcount of 1.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 48).unwrap();
    let at = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, at).unwrap();
    let rb = u64::from_be_bytes(b);
    let len = f.metadata().unwrap().len();
    f.set_len(len + 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), rb + 2 * (len / 65536))
        .unwrap();
    assert_eq!(kiln(&["disk", "check", s(&q)]).code, 3);
    if have_qemu_img() {
        assert_eq!(qemu_img(&["check", s(&q)]).1, 3);
    }
    // Corruption: the first data cluster's refcount zeroed.
    f.write_all_at(&0u16.to_be_bytes(), rb + 2).unwrap();
    assert_eq!(kiln(&["disk", "check", s(&q)]).code, 2);
}

#[test]
fn json_output_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // A base with data, an overlay with a data cluster, a zero cluster and holes, a
    // compressed image and a raw file.
    let raw = dir.join("base.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().take(3 << 20) {
        *b = (i % 13) as u8 + 1;
    }
    std::fs::write(&raw, &data).unwrap();
    let base = dir.join("base.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&base)]);
    let ov = dir.join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&ov),
    ]);
    let st = Command::new("qemu-io")
        .args(["-c", "write -P 7 0 64k", "-c", "write -z 1M 64k"])
        .arg(&ov)
        .output();
    if !st.is_ok_and(|o| o.status.success()) {
        kiln_e2e::skip("qemu-io not usable");
        return;
    }
    let comp = dir.join("comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&comp)]);

    let cd = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let in_dir = |args: Vec<String>, prog: &str| {
        let out = Command::new(prog)
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{prog} {args:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    for img in [&base, &ov, &comp, &raw] {
        let name = cd(img);
        let mut kargs: Vec<String> = ["disk", "info", "--output", "json"]
            .map(String::from)
            .to_vec();
        if img == &ov {
            kargs.extend(["--allow-backing".into(), "base.qcow2".into()]);
        }
        kargs.push(name.clone());
        let ours = in_dir(kargs, kiln_bin);
        let theirs = in_dir(
            vec![
                "info".into(),
                "--output".into(),
                "json".into(),
                name.clone(),
            ],
            "qemu-img",
        );
        assert_eq!(ours, theirs, "info {name}");

        let mut kargs: Vec<String> = ["disk", "map", "--output", "json"]
            .map(String::from)
            .to_vec();
        if img == &ov {
            kargs.extend(["--allow-backing".into(), "base.qcow2".into()]);
        }
        kargs.push(name.clone());
        if img != &raw {
            // qemu-img reports a raw file's holes; kiln maps raw layers as data.
            let ours = in_dir(kargs, kiln_bin);
            let theirs = in_dir(
                vec!["map".into(), "--output".into(), "json".into(), name.clone()],
                "qemu-img",
            );
            assert_eq!(ours, theirs, "map {name}");
        }

        if img != &raw {
            let ours = in_dir(
                ["disk", "check", "--output", "json", &name]
                    .map(String::from)
                    .to_vec(),
                kiln_bin,
            );
            let theirs = in_dir(
                vec![
                    "check".into(),
                    "--output".into(),
                    "json".into(),
                    name.clone(),
                ],
                "qemu-img",
            );
            assert_eq!(ours, theirs, "check {name}");
        }
    }
}
