//! Helpers shared by the integration tests: qemu-img, deterministic data.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Whether qemu-img runs here; tests that need it print SKIP and return when it does not.
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        kiln_e2e::skip("qemu-img not installed (Debian package qemu-utils)");
    }
    ok
}

/// Run qemu-img, panicking with its output on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?} failed: {text}");
    text
}

/// `qemu-img check` must report no errors and no leaks.
pub fn assert_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "qemu-img check {} failed: {text}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("check json");
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "qemu-img check {}: {key} = {n}: {text}",
            path.display()
        );
    }
}

/// `qemu-img compare` must find the two images identical.
pub fn assert_same(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test kit's seeded generator: data and choices that a seed repeats.
pub use kiln_e2e::pattern::Xorshift as Rng;

/// A raw file with a mix of random, compressible, and zero regions.
pub fn make_mixed_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < data.len() {
        let n = (rng.below(256 * 1024) as usize + 512).min(data.len() - pos);
        match rng.below(4) {
            0 => rng.fill(&mut data[pos..pos + n]),
            1 => {
                // compressible text-like
                for (i, b) in data[pos..pos + n].iter_mut().enumerate() {
                    *b = b"kiln disk layer "[i % 16];
                }
            }
            _ => {}
        }
        pos += n;
    }
    std::fs::write(path, &data).expect("write raw");
    data
}
