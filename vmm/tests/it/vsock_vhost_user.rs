//! The vsock vhost-user server over its socket, without QEMU: feature and protocol-feature
//! negotiation, the guest CID in config space, serving one frontend after another, the host
//! socket bound at spawn, and stopping idle or mid-connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kiln_vmm::devices::vsock::vhost_user::spawn;
use kiln_vmm::devices::vsock::VsockError;

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

fn send(s: &mut UnixStream, req: u32, flags: u32, body: &[u8]) {
    let mut msg = Vec::new();
    msg.extend(req.to_le_bytes());
    msg.extend((VERSION | flags).to_le_bytes());
    msg.extend((body.len() as u32).to_le_bytes());
    msg.extend(body);
    s.write_all(&msg).expect("send");
}

fn reply(s: &mut UnixStream, req: u32) -> Vec<u8> {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).expect("reply header");
    assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().expect("4")), req);
    let len = u32::from_le_bytes(hdr[8..12].try_into().expect("4")) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("reply body");
    body
}

fn u64_request(s: &mut UnixStream, req: u32) -> u64 {
    send(s, req, 0, &[]);
    let body = reply(s, req);
    u64::from_le_bytes(body[..8].try_into().expect("8"))
}

fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn negotiates_features_and_serves_frontends_one_after_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vsock.vhost");
    let uds = dir.path().join("vsock.sock");
    let handle = spawn(&sock, &uds, 42).expect("spawn");
    // Host programs can connect at once, before any QEMU.
    UnixStream::connect(&uds).expect("host socket bound at spawn");

    for round in 1..=2u64 {
        let mut s = connect(&sock);
        let features = u64_request(&mut s, GET_FEATURES);
        assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
        assert_ne!(features & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX");
        let proto = u64_request(&mut s, GET_PROTOCOL_FEATURES);
        assert_ne!(proto & (1 << 9), 0, "CONFIG");
        assert_ne!(proto & (1 << 13), 0, "RESET_DEVICE");
        send(
            &mut s,
            SET_PROTOCOL_FEATURES,
            0,
            &((1u64 << 9) | (1 << 13)).to_le_bytes(),
        );
        // GET_CONFIG: offset, size, flags, then the payload area.
        let mut body = Vec::new();
        body.extend(0u32.to_le_bytes());
        body.extend(8u32.to_le_bytes());
        body.extend(0u32.to_le_bytes());
        body.extend([0u8; 8]);
        send(&mut s, GET_CONFIG, NEED_REPLY, &body);
        let cfg = reply(&mut s, GET_CONFIG);
        assert_eq!(cfg.len(), 20, "{cfg:?}");
        assert_eq!(
            u64::from_le_bytes(cfg[12..20].try_into().expect("8")),
            42,
            "guest_cid in config space"
        );
        drop(s);
        wait_until("frontend counted", || handle.frontends() == round);
    }
    handle.stop();
    handle.join().expect("clean stop");
    assert!(!sock.exists(), "vhost-user socket removed on stop");
    assert!(!uds.exists(), "host socket removed on stop");
}

#[test]
fn stops_while_a_frontend_is_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vsock.vhost");
    let handle = spawn(&sock, &dir.path().join("vsock.sock"), 3).expect("spawn");
    let mut s = connect(&sock);
    assert_ne!(u64_request(&mut s, GET_FEATURES), 0);
    let start = Instant::now();
    handle.stop();
    handle.join().expect("clean stop");
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut buf = [0u8; 1];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "frontend closed"
    );
}

#[test]
fn rejects_reserved_cids_and_bad_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let r = spawn(&dir.path().join("a"), &dir.path().join("b"), cid);
        assert!(matches!(r, Err(VsockError::InvalidGuestCid(c)) if c == cid));
    }
    let r = spawn(&dir.path().join("a"), &dir.path().join("no/such/dir/b"), 3);
    assert!(matches!(r, Err(VsockError::BindHostSocket { .. })));
}
