//! Hostile source images: a `file:` or `url:` qcow2 whose backing name is a host file is
//! refused before anything boots, with an error naming the source and the backing name, and
//! the backing file's bytes end up nowhere (no module, not in the cache).

use std::path::Path;
use std::process::Command;

use crate::build_common::*;

const SECRET: &[u8] = b"kiln-secret-bytes-that-must-not-leak";

/// A qcow2 at `image` (64 KiB) whose backing name is exactly `name`, written by kiln itself.
fn overlay_naming(kiln: &Path, image: &Path, name: &str) {
    let out = run_kiln(
        kiln,
        &[
            "disk",
            "create",
            image.to_str().unwrap(),
            "64K",
            "-b",
            name,
            "-F",
            "raw",
        ],
    );
    assert!(out.status.success());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// No file under `dir` holds the secret.
fn assert_nowhere(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            assert_nowhere(&p);
        } else if p.file_name().is_some_and(|n| n != "secret.txt") {
            let bytes = std::fs::read(&p).unwrap_or_default();
            assert!(
                !contains(&bytes, SECRET),
                "{} holds the secret",
                p.display()
            );
        }
    }
}

fn build(kiln: &Path, dir: &Path, source: &str) -> (bool, String) {
    let m = dir.join("evil.yaml");
    std::fs::write(
        &m,
        format!(
            "vms:\n  - name: web\n    source:\n      {source}\n    cloudInit: {{}}\n    resources: {{ cpu: 1, memory: 512Mi }}\n"
        ),
    )
    .unwrap();
    let modules = dir.join("modules");
    let out = Command::new(kiln)
        .args([
            "build",
            m.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
        ])
        .env("KILN_CACHE", dir.join("cache"))
        .env("KILN_NO_INTERNET", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{err}");
    assert!(!modules.join("evil").exists());
    assert_no_partial_module(&modules);
    (out.status.success(), err)
}

#[test]
fn file_source_naming_a_host_file_is_refused_before_boot() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET.repeat(1000)).unwrap();
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    let mut cases = vec![
        ("absolute.qcow2", secret.to_str().unwrap().to_string()),
        ("a/b/relative.qcow2", "../../secret.txt".to_string()),
    ];
    if Path::new("/etc/hostname").is_file() {
        cases.push(("etc.qcow2", "/etc/hostname".to_string()));
    } else {
        kiln_e2e::skip("the /etc/hostname case (no /etc/hostname here)");
    }
    for (file, name) in cases {
        overlay_naming(&kiln, &dir.join(file), &name);
        let (ok, err) = build(&kiln, dir, &format!("file: {file}"));
        assert!(!ok);
        assert!(
            err.contains(file) && err.contains(&format!("{name:?}")) && err.contains("refusing"),
            "names the source and the backing name: {err}"
        );
        assert!(!err.contains("Booting"), "nothing may boot: {err}");
        assert!(!contains(err.as_bytes(), SECRET));
        assert_nowhere(dir);
    }
}

#[test]
fn url_source_naming_a_host_file_is_refused_before_boot() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET.repeat(1000)).unwrap();
    let image = dir.join("served.qcow2");
    overlay_naming(&kiln, &image, secret.to_str().unwrap());
    let body = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    // A loopback server handing out the hostile image.
    let port = kiln_e2e::http::Server::bytes(body).port;
    let url = format!("http://127.0.0.1:{port}/disk.qcow2");
    let (ok, err) = build(&kiln, dir, &format!("url: {url}"));
    assert!(!ok);
    assert!(
        err.contains(&url)
            && err.contains(&format!("{:?}", secret.to_str().unwrap()))
            && err.contains("refusing"),
        "names the source and the backing name: {err}"
    );
    assert!(!err.contains("Booting"), "nothing may boot: {err}");
    assert_nowhere(dir);
}
