//! The host side of a Linux guest on kiln's vhost-user-vsock, shared by the real-driver
//! tests: the static guest program (`helper.rs` here, built with rustc), the byte stream both
//! sides agree on, the Firecracker-style handshake, and a host echo listener.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use kiln_e2e::pattern::pattern;

/// Build the static guest program (`helper.rs`) with rustc at `out`.
pub fn build_helper(out: &Path) -> Result<(), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/vsock_guest/helper.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let o = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(out)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "rustc failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Host side of the Firecracker handshake; returns the stream and the host port in `OK`.
pub fn host_connect(uds: &Path, port: u32) -> std::io::Result<(UnixStream, Option<u32>)> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte so no echoed data is swallowed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok((s, None)),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok((s, None)),
            Err(e) => return Err(e),
        }
        assert!(line.len() < 64, "absurd reply {line:?}");
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let p = text
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {text:?}"));
    Ok((s, Some(p)))
}

/// Sends `len` bytes of [`pattern`] through the guest's echo service on `guest_port` and
/// checks they come back intact.
pub fn echo_through_guest(
    uds: &Path,
    guest_port: u32,
    seed: u64,
    len: usize,
) -> Result<(), String> {
    let (s, port) = host_connect(uds, guest_port).map_err(|e| e.to_string())?;
    let port = port.ok_or("CONNECT refused")?;
    assert!(port > 0);
    let data = pattern(seed, len);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&to_send);
        let _ = w.shutdown(std::net::Shutdown::Write);
        r
    });
    let mut back = Vec::with_capacity(len);
    let mut r = s;
    r.read_to_end(&mut back)
        .map_err(|e| format!("reading echo: {e}"))?;
    writer
        .join()
        .map_err(|_| "writer panicked")?
        .map_err(|e| format!("writing: {e}"))?;
    if back != data {
        return Err(format!(
            "echo differs: got {} bytes, sent {}",
            back.len(),
            len
        ));
    }
    Ok(())
}

pub fn host_echo_listener(path: PathBuf) -> UnixListener {
    let l = UnixListener::bind(&path).expect("bind host listener");
    let l2 = l.try_clone().expect("clone listener");
    std::thread::spawn(move || {
        for s in l2.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = match s.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    l
}
