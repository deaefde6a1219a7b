//! kiln's NBD export against qemu-nbd on the same file, in the same run.
//!
//! Run: `cargo bench -p kiln-disk --bench nbd_vs_qemu_nbd` (`KILN_NBD_BENCH_MIB` sets the
//! image size, 512 by default). Two cases, each timed as a `qemu-img convert` process:
//!  1. read: convert the export (a raw file with data and holes) to a raw file;
//!  2. write: convert that raw file into the export (`-n`, a raw file of the same size).
//!
//! Each case prints the best and the median of 3 rounds for kiln and for qemu-nbd (alternated,
//! so the page cache favours neither) and kiln's time over qemu-nbd's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_disk::nbd::{NbdOptions, NbdServer};
use kiln_disk::{BlockDevice, RawDevice};

const ROUNDS: usize = 3;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn timed(args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("spawn qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// Half pseudo-random data, half holes, in 1 MiB runs: holes cost both servers a read of
/// zeroes (no block status without structured replies), data costs the copy.
fn make_source(path: &Path, size: u64) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 0 {
            for b in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
        }
    }
    std::fs::write(path, &data).expect("write source");
}

fn raw_device(path: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .expect("open image");
    Arc::new(RawDevice::new(file, read_only).expect("raw device"))
}

/// qemu-nbd serving `image` on `sock`, once it accepts connections.
fn qemu_nbd(image: &Path, sock: &Path, read_only: bool) -> Child {
    let mut cmd = Command::new("qemu-nbd");
    // --persistent: the readiness probe below is a client too.
    cmd.args(["--persistent", "-f", "raw", "-k"]).arg(sock);
    if read_only {
        cmd.arg("-r");
    }
    let child = cmd.arg(image).spawn().expect("spawn qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe(sock) {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Whether an NBD server answers on `sock`: a whole handshake ended by NBD_OPT_ABORT, so
/// the server has nothing to complain about.
fn probe(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let mut msg = 1u32.to_be_bytes().to_vec(); // NBD_FLAG_C_FIXED_NEWSTYLE
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.read_exact(&mut [0u8; 18]).is_ok()
        && s.write_all(&msg).is_ok()
        && s.read_exact(&mut [0u8; 20]).is_ok()
}

fn stop(mut child: Child, sock: &Path) {
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(sock);
}

fn summary(mut t: Vec<Duration>) -> (Duration, Duration) {
    t.sort();
    (t[0], t[t.len() / 2])
}

fn report(case: &str, mib: u64, kiln: Vec<Duration>, peer: Vec<Duration>) {
    let (kb, km) = summary(kiln);
    let (qb, qm) = summary(peer);
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!(
        "{case}: kiln best {:.3}s ({:.0} MiB/s) median {:.3}s | qemu-nbd best {:.3}s ({:.0} MiB/s) median {:.3}s | kiln/qemu-nbd {:.2}",
        kb.as_secs_f64(),
        rate(kb),
        km.as_secs_f64(),
        qb.as_secs_f64(),
        rate(qb),
        qm.as_secs_f64(),
        kb.as_secs_f64() / qb.as_secs_f64()
    );
}

fn main() {
    if !have("qemu-img") || !have("qemu-nbd") {
        eprintln!("SKIP: qemu-img or qemu-nbd not installed (Debian package qemu-utils)");
        return;
    }
    let mib: u64 = std::env::var("KILN_NBD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let src = dir.path().join("src.raw");
    let out = dir.path().join("out.raw");
    let target = dir.path().join("target.raw");
    let sock = dir.path().join("nbd.sock");
    make_source(&src, mib << 20);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    println!(
        "{mib} MiB, load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let (mut kiln, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let server =
            NbdServer::bind(&sock, raw_device(&src, true), NbdOptions::default()).expect("bind");
        kiln.push(timed(&["convert", "-f", "raw", "-O", "raw", &uri, out_s]));
        server.shutdown().expect("shutdown");
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
        let _ = std::fs::remove_file(&out);

        let child = qemu_nbd(&src, &sock, true);
        peer.push(timed(&["convert", "-f", "raw", "-O", "raw", &uri, out_s]));
        stop(child, &sock);
        let _ = std::fs::remove_file(&out);
    }
    report("read", mib, kiln, peer);

    let (mut kiln, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        std::fs::File::create(&target)
            .and_then(|f| f.set_len(mib << 20))
            .expect("target");
        let server = NbdServer::bind(&sock, raw_device(&target, false), NbdOptions::default())
            .expect("bind");
        kiln.push(timed(&[
            "convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri,
        ]));
        server.shutdown().expect("shutdown");
        assert!(std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap());

        std::fs::File::create(&target)
            .and_then(|f| f.set_len(mib << 20))
            .expect("target");
        let child = qemu_nbd(&target, &sock, false);
        peer.push(timed(&[
            "convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri,
        ]));
        stop(child, &sock);
    }
    report("write", mib, kiln, peer);
}
