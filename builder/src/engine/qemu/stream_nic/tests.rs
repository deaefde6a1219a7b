use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// `frame` in QEMU's stream framing.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

/// The next frame on the switch side, waiting up to 5 s.
fn next_on_switch(switch: &kiln_net::QueuePort) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(n) = switch.recv(&mut buf).unwrap() {
            return buf[..n].to_vec();
        }
        assert!(Instant::now() < end, "no frame reached the switch");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next frame QEMU's side reads, in stream framing.
fn next_on_qemu(q: &mut UnixStream) -> Vec<u8> {
    q.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 4];
    q.read_exact(&mut head)
        .expect("a length prefix from the relay");
    let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
    q.read_exact(&mut body)
        .expect("a whole frame from the relay");
    body
}

/// Sends `frame` from the switch until QEMU's side reads it: the relay accepts a connection
/// on its own time, and frames before that are dropped like on an unplugged cable.
fn switch_to_qemu(switch: &kiln_net::QueuePort, q: &mut UnixStream, frame: &[u8]) {
    q.set_nonblocking(false).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        switch.send(frame).unwrap();
        q.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut head = [0u8; 4];
        match q.read_exact(&mut head) {
            Ok(()) => {
                let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
                q.read_exact(&mut body).unwrap();
                assert_eq!(body, frame);
                return;
            }
            Err(_) => assert!(Instant::now() < end, "no frame reached QEMU's side"),
        }
    }
}

/// A NIC of `model` served on a socket in a temp folder: the folder, the socket, the switch's
/// end of the NIC's port, and the relay.
fn rig(
    model: crate::job::NicModel,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    kiln_net::QueuePort,
    StreamNic,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net0.stream.sock");
    let (nic_end, switch) = kiln_net::port_pair(64).unwrap();
    let nic = NicAttach {
        name: "eth0".into(),
        mac: [2, 0x6b, 0x6c, 0, 0, 1],
        port: Arc::new(nic_end),
        model,
    };
    let relay = StreamNic::start(&sock, &nic).unwrap();
    (dir, sock, switch, relay)
}

#[test]
fn frames_cross_both_ways_and_a_new_qemu_gets_the_same_port() {
    let (_dir, sock, switch, mut relay) = rig(crate::job::NicModel::E1000);
    for boot in 0..3u8 {
        // Each boot is a fresh QEMU connecting to the same socket.
        let mut q = UnixStream::connect(&sock).unwrap();
        let out: Vec<u8> = (0..60).map(|b| b ^ boot).collect();
        q.write_all(&framed(&out)).unwrap();
        assert_eq!(next_on_switch(&switch), out, "boot {boot}: guest to switch");
        let back: Vec<u8> = vec![0xa5 ^ boot; MAX_FRAME];
        switch_to_qemu(&switch, &mut q, &back);
        switch.send(&[boot; 64]).unwrap();
        assert_eq!(next_on_qemu(&mut q), [boot; 64]);
        // The guest reboots: its QEMU exits.
        drop(q);
    }
    relay.stop();
    assert!(!sock.exists(), "the socket is removed when the NIC stops");
}

#[test]
fn a_qemu_breaking_the_framing_is_dropped_and_the_next_one_served() {
    let (_dir, sock, switch, _relay) = rig(crate::job::NicModel::E1000e);
    let mut bad = UnixStream::connect(&sock).unwrap();
    // A length no frame has: the relay closes this connection.
    bad.write_all(&u32::MAX.to_be_bytes()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing is sent on a broken connection");
    let mut good = UnixStream::connect(&sock).unwrap();
    good.write_all(&framed(&[7; 60])).unwrap();
    assert_eq!(next_on_switch(&switch), [7; 60]);
}
