//! Hostile images: a qcow2 whose backing name is a host file (absolute, `../../..`, or
//! `/etc/hostname`) is never followed unless the caller allows exactly that file, and an
//! external data file is refused. The backing file is only ever read, never written.

use crate::common;
use std::path::{Path, PathBuf};

use kiln_disk::{
    convert, create, info, map, open, BackingPolicy, ConvertOptions, CreateOptions, DiskError,
    Format, OpenOptions,
};

const SECRET: &[u8] = b"kiln-secret-bytes-that-must-not-leak\n";

/// A qcow2 at `image` whose backing name is exactly `name` (a raw backing), 64 KiB virtual.
fn overlay_naming(image: &Path, name: &str) {
    create(
        image,
        &CreateOptions {
            size: Some(65536),
            backing: Some(name.to_string()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
}

/// The cases: (image, backing name as written, the file it names).
fn hostile_images(dir: &Path) -> Vec<(PathBuf, String, PathBuf)> {
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET.repeat(100)).unwrap();
    let deep = dir.join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    let mut cases = Vec::new();
    let abs = dir.join("absolute.qcow2");
    overlay_naming(&abs, secret.to_str().unwrap());
    cases.push((abs, secret.display().to_string(), secret.clone()));
    let rel = deep.join("relative.qcow2");
    overlay_naming(&rel, "../../../secret.txt");
    cases.push((rel, "../../../secret.txt".to_string(), secret.clone()));
    let host = Path::new("/etc/hostname");
    if host.is_file() {
        let etc = dir.join("etc.qcow2");
        overlay_naming(&etc, "/etc/hostname");
        cases.push((etc, "/etc/hostname".to_string(), host.to_path_buf()));
    } else {
        kiln_e2e::skip("the /etc/hostname case (no /etc/hostname here)");
    }
    cases
}

fn assert_refused(e: DiskError, image: &Path, name: &str) {
    let msg = e.to_string();
    assert!(
        matches!(e, DiskError::BackingRefused { .. }),
        "not a refusal: {msg}"
    );
    assert!(
        msg.contains(&image.display().to_string()) && msg.contains(&format!("{name:?}")),
        "the error must name the image and the backing name as written: {msg}"
    );
    assert!(msg.contains("--allow-backing"), "says what to do: {msg}");
}

#[test]
fn backing_files_of_untrusted_images_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let other = d.path().join("other.raw");
    std::fs::write(&other, [0u8; 512]).unwrap();
    let only_other = BackingPolicy::only([&other]).unwrap();
    for (image, name, _) in hostile_images(d.path()) {
        for policy in [BackingPolicy::Refuse, only_other.clone()] {
            let e = open(
                &image,
                OpenOptions::read_only().with_backing(policy.clone()),
            )
            .err()
            .expect("open must refuse");
            assert_refused(e, &image, &name);
            assert_refused(info(&image, &policy).err().unwrap(), &image, &name);
            assert_refused(map(&image, &policy).err().unwrap(), &image, &name);
        }
        let e = open(&image, OpenOptions::untrusted()).err().unwrap();
        assert_refused(e, &image, &name);
    }
}

#[test]
fn an_explicitly_allowed_backing_file_is_followed() {
    let d = tempfile::tempdir().unwrap();
    for (image, _, target) in hostile_images(d.path()) {
        // Named through a different spelling (with `..`): compared after canonicalizing.
        let parent = target.parent().unwrap();
        let spelled = parent
            .join("..")
            .join(parent.file_name().unwrap())
            .join(target.file_name().unwrap());
        let policy = BackingPolicy::only([&spelled]).unwrap();
        let dev = open(
            &image,
            OpenOptions::read_only().with_backing(policy.clone()),
        )
        .unwrap();
        let want = std::fs::read(&target).unwrap();
        let n = want.len().min(4096);
        let mut got = vec![0u8; n];
        dev.read_at(&mut got, 0).unwrap();
        assert_eq!(got, want[..n]);
        assert_eq!(info(&image, &policy).unwrap().chain.len(), 2);
    }
}

#[test]
fn convert_of_a_refused_image_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for (image, name, _) in hostile_images(d.path()) {
        let dst = out.path().join("out.qcow2");
        let r = open(&image, OpenOptions::untrusted())
            .and_then(|dev| convert(dev.as_ref(), &dst, &ConvertOptions::default()));
        assert_refused(r.err().unwrap(), &image, &name);
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
}

#[test]
fn external_data_files_are_refused() {
    if !common::have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data.raw");
    let img = d.path().join("ext.qcow2");
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        img.to_str().unwrap(),
        "1M",
    ]);
    for opts in [OpenOptions::untrusted(), OpenOptions::read_only()] {
        let e = open(&img, opts).err().unwrap().to_string();
        assert!(
            e.contains(&img.display().to_string()) && e.contains("external data file"),
            "{e}"
        );
    }
    let e = info(&img, &BackingPolicy::Refuse)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("external data file"), "{e}");
}
