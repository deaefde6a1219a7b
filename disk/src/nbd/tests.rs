//! The NBD export driven by QEMU's own tools (qemu-io, qemu-img) and by hostile clients
//! written here.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire::*;
use super::{NbdOptions, NbdServer};
use crate::{BlockDevice, OpenOptions, RawDevice};

/// Whether a QEMU tool runs here; callers print why they skip.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} not installed (Debian package qemu-utils)");
    }
    ok
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed: {text}");
    text
}

fn nbd_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Deterministic bytes (xorshift).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw device on a new file holding `data`.
fn raw_device(dir: &Path, data: &[u8], read_only: bool) -> Arc<dyn BlockDevice> {
    let path = dir.join("disk.raw");
    std::fs::write(&path, data).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .unwrap();
    Arc::new(RawDevice::new(file, read_only).unwrap())
}

fn serve(dir: &Path, dev: Arc<dyn BlockDevice>, opts: NbdOptions) -> (NbdServer, PathBuf) {
    let sock = dir.join("nbd.sock");
    let server = NbdServer::bind(&sock, dev, opts).expect("bind");
    (server, sock)
}

/// What [`served`] sets up: the folder, the data, the device, the server and its socket.
type Served = (
    tempfile::TempDir,
    Vec<u8>,
    Arc<dyn BlockDevice>,
    NbdServer,
    PathBuf,
);

/// A raw device holding `pattern(size, seed)`, served.
fn served(size: usize, seed: u64, read_only: bool, opts: NbdOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(size, seed);
    let dev = raw_device(dir.path(), &data, read_only);
    let (server, sock) = serve(dir.path(), dev.clone(), opts);
    (dir, data, dev, server, sock)
}

#[test]
fn qemu_io_writes_through_the_export_into_a_qcow2_overlay() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("vm.qcow2");
    crate::create(
        &base,
        &crate::CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    crate::create_overlay(&overlay, &base, None).unwrap();
    let dev = crate::open(&overlay, OpenOptions::read_write()).unwrap();
    let (server, sock) = serve(dir.path(), dev, NbdOptions::default());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "discard 64k 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -f -P 0xcd 2M 64k",
            &nbd_uri(&sock),
        ],
    );
    assert!(!out.contains("fail"), "qemu-io: {out}");
    assert!(
        out.contains("wrote 1048576/1048576 bytes"),
        "qemu-io: {out}"
    );
    assert!(out.contains("read 1048576/1048576 bytes"), "qemu-io: {out}");
    server.shutdown().expect("shutdown");
    assert!(!sock.exists(), "socket left behind");

    let check = run("qemu-img", &["check", overlay.to_str().unwrap()]);
    assert!(check.contains("No errors"), "qemu-img check: {check}");
    // qemu reads the capture as kiln wrote it.
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xab 128k 896k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0xcd 2M 64k",
            "-c",
            "read -P 0 3M 1M",
            overlay.to_str().unwrap(),
        ],
    );
    assert!(
        !out.contains("fail") && !out.contains("mismatch"),
        "qemu-io: {out}"
    );
    // And kiln-disk does too.
    let dev = crate::open(&overlay, OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    dev.read_at(&mut buf, 0).unwrap();
    let expect = |range: std::ops::Range<usize>, v: u8| {
        assert!(
            buf[range.clone()].iter().all(|&b| b == v),
            "{range:?} != {v:#x}"
        );
    };
    expect(0..64 << 10, 0xab);
    expect(64 << 10..128 << 10, 0);
    expect(128 << 10..1 << 20, 0xab);
    expect(1 << 20..(1 << 20) + (64 << 10), 0);
    expect(2 << 20..(2 << 20) + (64 << 10), 0xcd);
}

#[test]
fn qemu_img_convert_reads_the_export_exactly() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of 4 KiB, so the last request is short.
    let data = pattern((5 << 20) + 1536, 7);
    let dev = raw_device(dir.path(), &data, true);
    let (server, sock) = serve(dir.path(), dev, NbdOptions::default());
    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &nbd_uri(&sock),
            out.to_str().unwrap(),
        ],
    );
    server.shutdown().unwrap();
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "converted bytes differ from the pattern");
}

// ---- a hand-written client, to send what QEMU never would ----

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Read the greeting and send client flags.
fn greet(s: &mut UnixStream, client_flags: u32) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g[0..8]), NBDMAGIC);
    assert_eq!(be64(&g[8..16]), IHAVEOPT);
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s.write_all(&client_flags.to_be_bytes()).unwrap();
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// One option reply: (option, type, data).
fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC);
    let mut data = vec![0u8; be32(&h[16..20]) as usize];
    s.read_exact(&mut data).unwrap();
    (be32(&h[8..12]), be32(&h[12..16]), data)
}

fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// What NBD_OPT_INFO/GO answered: size, transmission flags, block sizes, final reply type.
#[derive(Debug, Default)]
struct Info {
    size: u64,
    flags: u16,
    block: Option<(u32, u32, u32)>,
    last: u32,
}

fn info_replies(s: &mut UnixStream, opt: u32) -> Info {
    let mut info = Info::default();
    loop {
        let (o, kind, d) = option_reply(s);
        assert_eq!(o, opt);
        if kind != REP_INFO {
            info.last = kind;
            return info;
        }
        match u16::from_be_bytes([d[0], d[1]]) {
            INFO_EXPORT => {
                info.size = be64(&d[2..10]);
                info.flags = u16::from_be_bytes([d[10], d[11]]);
            }
            INFO_BLOCK_SIZE => {
                info.block = Some((be32(&d[2..6]), be32(&d[6..10]), be32(&d[10..14])))
            }
            other => panic!("unexpected info {other}"),
        }
    }
}

/// Handshake as QEMU does it: fixed newstyle, no zeroes, NBD_OPT_GO asking for block sizes.
fn go(sock: &Path) -> (UnixStream, Info) {
    let mut s = connect(sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_option(&mut s, OPT_GO, &info_request("", &[INFO_BLOCK_SIZE]));
    let info = info_replies(&mut s, OPT_GO);
    assert_eq!(info.last, REP_ACK);
    (s, info)
}

fn request(s: &mut UnixStream, kind: u16, flags: u16, offset: u64, len: u32, handle: u64) {
    let r = Request {
        flags,
        kind,
        handle,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
}

/// A simple reply's error value, checking the handle.
fn simple_reply(s: &mut UnixStream, handle: u64) -> u32 {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
    assert_eq!(be64(&h[8..16]), handle);
    be32(&h[4..8])
}

fn read_ok(s: &mut UnixStream, offset: u64, len: u32) -> Vec<u8> {
    request(s, CMD_READ, 0, offset, len, 99);
    assert_eq!(simple_reply(s, 99), 0);
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    data
}

/// The server closed the connection (possibly after bytes the caller does not care about).
fn assert_closed(s: &mut UnixStream) {
    let mut sink = Vec::new();
    s.read_to_end(&mut sink)
        .expect("the server closes instead of leaving the client waiting");
}

/// A fresh, well-behaved client still gets the right data.
fn assert_serving(sock: &Path, data: &[u8]) {
    let (mut s, info) = go(sock);
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(read_ok(&mut s, 4096, 8192), &data[4096..4096 + 8192]);
    request(&mut s, CMD_DISC, 0, 0, 0, 1);
}

#[test]
fn handshake_answers_every_option_and_describes_the_export() {
    let opts = NbdOptions {
        export_name: "disk0".into(),
        ..Default::default()
    };
    let (_dir, data, _dev, server, sock) = served(1 << 20, 3, false, opts);

    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_LIST, &[]);
    let (_, kind, d) = option_reply(&mut s);
    assert_eq!((kind, &d[..]), (REP_SERVER, &b"\0\0\0\x05disk0"[..]));
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    send_option(&mut s, OPT_LIST, b"x");
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID);
    // Structured replies, STARTTLS and unknown options: refused, the session goes on.
    for opt in [8, 5, 4242] {
        send_option(&mut s, opt, b"ignored");
        assert_eq!(option_reply(&mut s).1, REP_ERR_UNSUP, "option {opt}");
    }
    send_option(&mut s, OPT_INFO, &info_request("other", &[]));
    assert_eq!(info_replies(&mut s, OPT_INFO).last, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_INFO, b"\0\0\0\x09disk0");
    assert_eq!(info_replies(&mut s, OPT_INFO).last, REP_ERR_INVALID);
    send_option(&mut s, OPT_INFO, &info_request("disk0", &[INFO_BLOCK_SIZE]));
    let info = info_replies(&mut s, OPT_INFO);
    assert_eq!(info.last, REP_ACK);
    assert_eq!(info.size, data.len() as u64);
    let all =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    assert_eq!(info.flags, all);
    assert_eq!(info.block, Some((1, 4096, 32 << 20)));
    // NBD_OPT_EXPORT_NAME by name, with the 124 zero bytes (NO_ZEROES not asked for).
    send_option(&mut s, OPT_EXPORT_NAME, b"disk0");
    let mut reply = [0u8; 134];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(be64(&reply[0..8]), data.len() as u64);
    assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), all);
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(read_ok(&mut s, 0, 512), &data[..512]);
    request(&mut s, CMD_DISC, 0, 0, 0, 1);
    assert_closed(&mut s);

    // NBD_OPT_ABORT is acknowledged.
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    assert_closed(&mut s);
    // An unknown name with NBD_OPT_EXPORT_NAME cannot be answered: the session ends.
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert_closed(&mut s);
    server.shutdown().unwrap();
}

#[test]
fn sector_devices_make_the_client_ask_for_block_sizes() {
    let opts = NbdOptions {
        min_block: 512,
        ..Default::default()
    };
    let (dir, data, _dev, server, sock) = served(64 << 10, 5, false, opts);
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_GO, &info_request("", &[]));
    assert_eq!(info_replies(&mut s, OPT_GO).last, REP_ERR_BLOCK_SIZE_REQD);
    send_option(&mut s, OPT_GO, &info_request("", &[INFO_BLOCK_SIZE]));
    let info = info_replies(&mut s, OPT_GO);
    assert_eq!(
        (info.last, info.block),
        (REP_ACK, Some((512, 4096, 32 << 20)))
    );
    assert_eq!(read_ok(&mut s, 512, 512), &data[512..1024]);
    drop(s);
    server.shutdown().unwrap();
    let odd = pattern(1000, 1);
    assert!(NbdServer::bind(
        dir.path().join("odd.sock"),
        raw_device(dir.path(), &odd, false),
        NbdOptions {
            min_block: 512,
            ..Default::default()
        }
    )
    .is_err());
    assert!(NbdServer::bind(
        dir.path().join("x.sock"),
        raw_device(dir.path(), &data, false),
        NbdOptions {
            min_block: 4096,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn requests_stay_within_the_configured_maximum() {
    let opts = NbdOptions {
        max_request: 64 << 10,
        ..Default::default()
    };
    let (_dir, data, _dev, server, sock) = served(1 << 20, 31, false, opts);
    let (mut s, info) = go(&sock);
    assert_eq!(info.block, Some((1, 4096, 64 << 10)));
    assert_eq!(read_ok(&mut s, 0, 64 << 10), &data[..64 << 10]);
    request(&mut s, CMD_READ, 0, 0, (64 << 10) + 1, 1);
    assert_eq!(simple_reply(&mut s, 1), EINVAL);
    request(&mut s, CMD_DISC, 0, 0, 0, 2);
    drop(s);
    // QEMU splits its requests to fit what NBD_INFO_BLOCK_SIZE announced.
    if have("qemu-io") {
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 1M",
                "-c",
                "read -P 0x5a 0 1M",
                &nbd_uri(&sock),
            ],
        );
        assert!(!out.contains("fail"), "qemu-io: {out}");
        assert!(out.contains("read 1048576/1048576 bytes"), "qemu-io: {out}");
    }
    server.shutdown().unwrap();
}

#[test]
fn commands_write_trim_zero_and_flush_the_device() {
    let (_dir, data, dev, server, sock) = served(1 << 20, 11, false, NbdOptions::default());
    let (mut s, _) = go(&sock);
    let payload = pattern(8192, 12);
    request(&mut s, CMD_WRITE, CMD_FLAG_FUA, 4096, 8192, 1);
    s.write_all(&payload).unwrap();
    assert_eq!(simple_reply(&mut s, 1), 0);
    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 65536, 4096, 2);
    assert_eq!(simple_reply(&mut s, 2), 0);
    request(&mut s, CMD_TRIM, 0, 131072, 65536, 3);
    assert_eq!(simple_reply(&mut s, 3), 0);
    request(&mut s, CMD_FLUSH, 0, 0, 0, 4);
    assert_eq!(simple_reply(&mut s, 4), 0);
    // Length 0 does nothing and succeeds.
    request(&mut s, CMD_WRITE, 0, 0, 0, 5);
    assert_eq!(simple_reply(&mut s, 5), 0);
    assert_eq!(read_ok(&mut s, 4096, 8192), payload);
    assert!(read_ok(&mut s, 65536, 4096).iter().all(|&b| b == 0));
    // Unknown commands and flags not defined for a command are EINVAL.
    request(&mut s, 5, 0, 0, 4096, 6);
    assert_eq!(simple_reply(&mut s, 6), EINVAL);
    request(&mut s, CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096, 7);
    assert_eq!(simple_reply(&mut s, 7), EINVAL);
    request(&mut s, CMD_WRITE, 1 << 9, 0, 4, 8);
    s.write_all(b"abcd").unwrap();
    assert_eq!(simple_reply(&mut s, 8), EINVAL);
    request(&mut s, CMD_DISC, 0, 0, 0, 9);
    assert_closed(&mut s);
    server.shutdown().unwrap();
    let mut back = vec![0u8; 8192];
    dev.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, payload);
    let mut untouched = vec![0u8; 4];
    dev.read_at(&mut untouched, 0).unwrap();
    assert_eq!(untouched, data[..4]);
}

#[test]
fn a_read_only_device_refuses_writes_with_eperm() {
    let (_dir, data, _dev, server, sock) = served(64 << 10, 13, true, NbdOptions::default());
    let (mut s, info) = go(&sock);
    assert_ne!(info.flags & FLAG_READ_ONLY, 0);
    request(&mut s, CMD_WRITE, 0, 0, 512, 1);
    s.write_all(&[0xee; 512]).unwrap();
    assert_eq!(simple_reply(&mut s, 1), EPERM);
    for (kind, h) in [(CMD_TRIM, 2), (CMD_WRITE_ZEROES, 3)] {
        request(&mut s, kind, 0, 0, 512, h);
        assert_eq!(simple_reply(&mut s, h), EPERM);
    }
    assert_eq!(read_ok(&mut s, 0, 512), &data[..512]);
    drop(s);
    server.shutdown().unwrap();
}

#[test]
fn hostile_clients_get_errors_or_a_closed_connection_and_the_server_lives_on() {
    let (_dir, data, dev, server, sock) = served(1 << 20, 17, false, NbdOptions::default());
    let size = data.len() as u64;

    // Unknown client flags.
    let mut s = connect(&sock);
    greet(&mut s, 0x80);
    assert_closed(&mut s);
    assert_serving(&sock, &data);

    // Bad option magic.
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert_closed(&mut s);
    assert_serving(&sock, &data);

    // An option claiming 4 GiB of data: refused at once, nothing read or allocated.
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&m).unwrap();
    let started = Instant::now();
    assert_eq!(option_reply(&mut s).1, REP_ERR_TOO_BIG);
    assert_closed(&mut s);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_serving(&sock, &data);

    // Reads past the end, and offsets that overflow: EINVAL, the connection stays usable.
    let (mut s, _) = go(&sock);
    for (h, offset, len) in [
        (1, size - 512, 4096),
        (2, size, 1),
        (3, u64::MAX - 10, 4096),
    ] {
        request(&mut s, CMD_READ, 0, offset, len, h);
        assert_eq!(simple_reply(&mut s, h), EINVAL, "read at {offset}+{len}");
    }
    // Writes past the end: ENOSPC, the payload consumed.
    request(&mut s, CMD_WRITE, 0, size - 2, 4, 4);
    s.write_all(b"wxyz").unwrap();
    assert_eq!(simple_reply(&mut s, 4), ENOSPC);
    request(&mut s, CMD_WRITE_ZEROES, 0, u64::MAX, 1, 5);
    assert_eq!(simple_reply(&mut s, 5), ENOSPC);
    request(&mut s, CMD_TRIM, 0, size, 4096, 6);
    assert_eq!(simple_reply(&mut s, 6), EINVAL);
    // A read over the maximum: EINVAL without a payload.
    request(&mut s, CMD_READ, 0, 0, (32 << 20) + 1, 7);
    assert_eq!(simple_reply(&mut s, 7), EINVAL);
    assert_eq!(read_ok(&mut s, 0, 4096), &data[..4096]);
    // A write over the maximum: its payload is never read, so the connection ends.
    request(&mut s, CMD_WRITE, 0, 0, u32::MAX, 8);
    assert_eq!(simple_reply(&mut s, 8), EINVAL);
    assert_closed(&mut s);
    assert_serving(&sock, &data);

    // Bad request magic.
    let (mut s, _) = go(&sock);
    s.write_all(&[0x55; REQUEST_LEN]).unwrap();
    assert_closed(&mut s);

    // A client gone halfway through a write's payload: nothing of it is written.
    let (mut s, _) = go(&sock);
    request(&mut s, CMD_WRITE, 0, 8192, 65536, 1);
    s.write_all(&[0xee; 1000]).unwrap();
    drop(s);
    // A client gone halfway through a request header.
    let (mut s, _) = go(&sock);
    s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(s);
    // And one that leaves mid-handshake.
    let mut s = connect(&sock);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    assert_serving(&sock, &data);
    server.shutdown().unwrap();
    let mut back = vec![0u8; 65536];
    dev.read_at(&mut back, 8192).unwrap();
    assert!(
        back == data[8192..8192 + 65536],
        "a torn write reached the device"
    );
}

#[test]
fn a_stalled_handshake_times_out_so_the_next_client_is_served() {
    let opts = NbdOptions {
        handshake_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let (_dir, data, _dev, server, sock) = served(64 << 10, 19, false, opts);
    let mut idle = connect(&sock);
    let mut g = [0u8; 18];
    idle.read_exact(&mut g).unwrap();
    // Sends nothing more; the second client waits in the backlog until the first is dropped.
    assert_serving(&sock, &data);
    assert_closed(&mut idle);
    server.shutdown().unwrap();
}

#[test]
fn a_second_client_waits_until_the_first_is_done() {
    let (_dir, data, _dev, server, sock) = served(64 << 10, 23, false, NbdOptions::default());
    let (mut first, _) = go(&sock);
    let mut second = connect(&sock);
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut g = [0u8; 18];
    let err = second.read_exact(&mut g).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    assert_eq!(read_ok(&mut first, 0, 512), &data[..512]);
    request(&mut first, CMD_DISC, 0, 0, 0, 1);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    second.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g[0..8]), NBDMAGIC);
    drop(second);
    server.shutdown().unwrap();
}

#[test]
fn shutdown_ends_a_connected_client_and_flushes() {
    let (dir, data, _dev, server, sock) = served(64 << 10, 29, false, NbdOptions::default());
    let (mut s, _) = go(&sock);
    request(&mut s, CMD_WRITE, 0, 0, 4, 1);
    s.write_all(b"kiln").unwrap();
    assert_eq!(simple_reply(&mut s, 1), 0);
    let started = Instant::now();
    server.shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown waited for an idle client"
    );
    assert_closed(&mut s);
    assert!(UnixStream::connect(&sock).is_err(), "still accepting");
    assert_eq!(
        &std::fs::read(dir.path().join("disk.raw")).unwrap()[..4],
        b"kiln"
    );
    // The socket path is free again.
    let (server, _) = serve(
        dir.path(),
        raw_device(dir.path(), &data, false),
        NbdOptions::default(),
    );
    drop(server);
}
