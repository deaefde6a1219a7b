//! The vhost-user server around virtio-blk: feature negotiation over the socket, serving
//! one frontend after another, and stopping from idle or mid-connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_disk::{BlockDevice, BlockResult};
use kiln_vmm::devices::block::vhost_user::spawn;
use kiln_vmm::devices::block::BlockOptions;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO};

struct MemDisk(Mutex<Vec<u8>>, bool);

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        kiln_disk::check_range(self.size(), offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        kiln_disk::check_range(self.size(), offset, buf.len() as u64)?;
        let o = offset as usize;
        self.0.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
}

fn disk(ro: bool) -> Arc<dyn BlockDevice> {
    Arc::new(MemDisk(Mutex::new(vec![0; 1 << 20]), ro))
}

/// Send VHOST_USER_GET_FEATURES and return the answer.
fn get_features(s: &mut UnixStream) -> u64 {
    const GET_FEATURES: u32 = 1;
    const VERSION_1: u32 = 0x1;
    let mut msg = Vec::new();
    msg.extend(GET_FEATURES.to_le_bytes());
    msg.extend(VERSION_1.to_le_bytes());
    msg.extend(0u32.to_le_bytes());
    s.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        GET_FEATURES
    );
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
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
fn serves_frontends_one_after_another_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let opts = BlockOptions {
        read_only: false,
        serial: "x".into(),
        num_queues: 2,
    };
    let h = spawn(&sock, disk(false), opts).unwrap();

    let mut a = UnixStream::connect(&sock).unwrap();
    let f = get_features(&mut a);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
    // The count goes up just after the accept, maybe after the daemon has already answered.
    wait_until("one connection", || h.connections() == 1);
    drop(a);

    // The next frontend is served once the first is gone.
    let mut b = UnixStream::connect(&sock).unwrap();
    let f2 = get_features(&mut b);
    assert_eq!(f, f2);
    wait_until("two connections", || h.connections() == 2);

    // Stopping while a frontend is connected ends that connection and the thread.
    let start = Instant::now();
    h.stop();
    h.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut buf = [0u8; 1];
    assert_eq!(
        b.read(&mut buf).unwrap_or(0),
        0,
        "connection should be closed"
    );
}

#[test]
fn stop_while_idle_and_read_only_features() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ro.sock");
    let h = spawn(&sock, disk(true), BlockOptions::default()).unwrap();
    let mut a = UnixStream::connect(&sock).unwrap();
    let f = get_features(&mut a);
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    drop(a);
    wait_until("the first connection to end", || h.connections() == 1);
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    h.stop();
    h.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn dropping_the_handle_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("drop.sock");
    let h = spawn(&sock, disk(false), BlockOptions::default()).unwrap();
    assert!(sock.exists());
    drop(h);
    // The listener is gone with its socket file, and nobody would answer anyway.
    assert!(!sock.exists(), "the socket file should be removed");
    if let Ok(mut s) = UnixStream::connect(&sock) {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let _ = s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut buf = [0u8; 20];
        assert!(s.read_exact(&mut buf).is_err());
    }
}
