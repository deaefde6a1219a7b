//! virtio-vsock in a kiln VM: kiln's vsock device (`VirtioVsock`, the same `VsockHandler`
//! the vhost-user backend serves to QEMU) behind kiln-vmm's virtio-mmio transport. A tiny
//! guest driver (`kvm_support::virtio_guest`) does the virtio handshake, reads its CID from
//! config space, posts RX buffers and speaks the virtio-vsock stream protocol itself
//! (packet headers in its own memory, ports copied from the packets it receives), through
//! the transport's registers, its rings, QueueNotify (ioeventfd) and the device interrupt
//! (irqfd).
//!
//! The checks are those of `vsock_qemu.rs`: the host connects to the VM's Unix socket with
//! `CONNECT <port>\n` and gets `OK <hostport>\n`; the guest connects to host port P and
//! reaches the listener at `<socket>_<P>`; data both ways on each connection, and a clean
//! close that the host sees as end of stream.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::kvm_support::virtio_guest::{reg, Buf, Device, Script, Virtq, VIRTIO_F_VERSION_1};
use crate::kvm_support::{finish_script, kvm_or_skip, log_warnings, start_script};
use kiln_vmm::devices::vsock::device::VIRTIO_ID_VSOCK;
use kiln_vmm::devices::vsock::VirtioVsock;

const GUEST_CID: u64 = 42;
const HOST_CID: u64 = 2;
/// The port the guest "listens" on for the host's CONNECT.
const GUEST_PORT: u32 = 1234;
/// The host port the guest connects to, and the guest's own end of that connection.
const HOST_PORT: u32 = 5000;
const GUEST_LOCAL_PORT: u32 = 0x8000;
const BUF_ALLOC: u32 = 64 << 10;

const HDR: u32 = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const TYPE_STREAM: u16 = 1;
const SHUTDOWN_BOTH: u32 = 3;

const HOST_MSG: usize = 300;
const GUEST_MSG: usize = 700;
const GUEST_MSG2: usize = 1000;
const HOST_MSG2: usize = 2000;

fn msg(len: usize, tag: u8) -> Vec<u8> {
    (0..len)
        .map(|i| tag ^ (i as u8).wrapping_mul(7).wrapping_add((i >> 8) as u8))
        .collect()
}

struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    fwd_cnt: u32,
}

impl Header {
    /// A packet from the guest to the host.
    fn out(src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            op,
            flags: 0,
            fwd_cnt: 0,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HDR as usize);
        h.extend_from_slice(&self.src_cid.to_le_bytes());
        h.extend_from_slice(&self.dst_cid.to_le_bytes());
        h.extend_from_slice(&self.src_port.to_le_bytes());
        h.extend_from_slice(&self.dst_port.to_le_bytes());
        h.extend_from_slice(&self.len.to_le_bytes());
        h.extend_from_slice(&TYPE_STREAM.to_le_bytes());
        h.extend_from_slice(&self.op.to_le_bytes());
        h.extend_from_slice(&self.flags.to_le_bytes());
        h.extend_from_slice(&BUF_ALLOC.to_le_bytes());
        h.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        h
    }
}

/// Header field offsets.
mod off {
    pub const SRC_CID: u64 = 0;
    pub const DST_CID: u64 = 8;
    pub const SRC_PORT: u64 = 16;
    pub const DST_PORT: u64 = 20;
    pub const LEN: u64 = 24;
    pub const TYPE: u64 = 28;
    pub const OP: u64 = 30;
    pub const FLAGS: u64 = 32;
}

/// The guest's side of the driver: RX buffers and what it knows of each.
struct Guest {
    s: Script,
    rx: Virtq,
    tx: Virtq,
    /// Header and data address of each RX buffer, in posting order (the device uses them
    /// in that order).
    rx_bufs: Vec<(u16, u64, u64)>,
    rx_next: usize,
}

impl Guest {
    /// Wait for the next packet from the device and check its header; returns the header
    /// and data addresses.
    fn receive(&mut self, op: u16, len: u32, src_port: Option<u32>, dst_port: u32) -> (u64, u64) {
        let what = format!("rx packet {} (op {op})", self.rx_next);
        let (head, h, d) = self.rx_bufs[self.rx_next];
        let n = self.rx_next as u16;
        self.rx_next += 1;
        self.s.wait_used(&mut self.rx, 1, &what);
        self.s.expect_used(&self.rx, n, head, HDR + len, &what);
        let s = &mut self.s;
        s.expect(8, h + off::SRC_CID, HOST_CID, format!("{what}: src_cid"));
        s.expect(8, h + off::DST_CID, GUEST_CID, format!("{what}: dst_cid"));
        if let Some(p) = src_port {
            s.expect(4, h + off::SRC_PORT, p.into(), format!("{what}: src_port"));
        }
        s.expect(
            4,
            h + off::DST_PORT,
            dst_port.into(),
            format!("{what}: dst_port"),
        );
        s.expect(4, h + off::LEN, len.into(), format!("{what}: len"));
        s.expect(
            2,
            h + off::TYPE,
            TYPE_STREAM.into(),
            format!("{what}: type"),
        );
        s.expect(2, h + off::OP, op.into(), format!("{what}: op"));
        (h, d)
    }

    /// Send a packet: `hdr`, with its destination port copied from the source port of the
    /// received header at `peer_hdr` when given, and `data`.
    fn send(&mut self, hdr: Header, peer_hdr: Option<u64>, data: &[u8], what: &str) {
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        let h = self.s.place(&hdr.bytes());
        if let Some(p) = peer_hdr {
            self.s.copy(
                h + off::DST_PORT,
                p + off::SRC_PORT,
                4,
                "reply to the peer's port",
            );
        }
        let chain = if data.is_empty() {
            vec![Buf::R(h, HDR)]
        } else {
            let d = self.s.place(data);
            vec![Buf::R(h, HDR), Buf::R(d, data.len() as u32)]
        };
        // TX chains complete with nothing written.
        self.s.submit(&mut self.tx, &chain, 0, what);
    }
}

fn script() -> Script {
    let mut s = Script::new(1);
    let dev = Device::new(0);
    let mut rx = s.virtq(dev, 0, 32);
    let tx = s.virtq(dev, 1, 16);
    let event = s.virtq(dev, 2, 16);
    s.init_device(
        dev,
        VIRTIO_ID_VSOCK,
        VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1,
        256,
        &[&rx, &tx, &event],
    );
    s.expect(4, dev.reg(reg::CONFIG), GUEST_CID, "config: guest_cid low");
    s.expect(4, dev.reg(reg::CONFIG + 4), 0, "config: guest_cid high");
    let mut rx_bufs = Vec::new();
    for _ in 0..8 {
        let h = s.alloc(u64::from(HDR), 64);
        let d = s.alloc(4096, 4096);
        s.write(2, h + off::OP, 0xffff, "op poison");
        let head = s.add_chain(&mut rx, &[Buf::W(h, HDR), Buf::W(d, 4096)]);
        rx_bufs.push((head, h, d));
    }
    s.kick(&rx);
    let mut g = Guest {
        s,
        rx,
        tx,
        rx_bufs,
        rx_next: 0,
    };

    // Host -> guest: the host's CONNECT arrives as a REQUEST from a port the device chose;
    // the guest prints that port (the host compares it with its OK line) and accepts.
    let (req, _) = g.receive(OP_REQUEST, 0, None, GUEST_PORT);
    g.s.print("hostport=");
    g.s.print_hex(4, req + off::SRC_PORT);
    g.s.print("\n");
    g.send(
        Header::out(GUEST_PORT, 0, OP_RESPONSE),
        Some(req),
        &[],
        "accept the host's connection",
    );
    let (h, d) = g.receive(OP_RW, HOST_MSG as u32, None, GUEST_PORT);
    g.s.compare(
        h + off::SRC_PORT,
        req + off::SRC_PORT,
        4,
        "data from the same port",
    );
    g.s.compare_with(d, &msg(HOST_MSG, 0x11), "the host's data");
    let mut rw = Header::out(GUEST_PORT, 0, OP_RW);
    rw.fwd_cnt = HOST_MSG as u32;
    g.send(rw, Some(req), &msg(GUEST_MSG, 0x22), "answer the host");
    let mut shut = Header::out(GUEST_PORT, 0, OP_SHUTDOWN);
    shut.flags = SHUTDOWN_BOTH;
    shut.fwd_cnt = HOST_MSG as u32;
    g.send(shut, Some(req), &[], "close the host's connection");
    let (h, _) = g.receive(OP_RST, 0, None, GUEST_PORT);
    g.s.compare(
        h + off::SRC_PORT,
        req + off::SRC_PORT,
        4,
        "RST for that connection",
    );

    // Guest -> host: REQUEST to HOST_PORT reaches the listener at <uds>_HOST_PORT.
    g.send(
        Header::out(GUEST_LOCAL_PORT, HOST_PORT, OP_REQUEST),
        None,
        &[],
        "connect to the host",
    );
    g.receive(OP_RESPONSE, 0, Some(HOST_PORT), GUEST_LOCAL_PORT);
    g.send(
        Header::out(GUEST_LOCAL_PORT, HOST_PORT, OP_RW),
        None,
        &msg(GUEST_MSG2, 0x33),
        "send to the host",
    );
    let (h, d) = g.receive(OP_RW, HOST_MSG2 as u32, Some(HOST_PORT), GUEST_LOCAL_PORT);
    g.s.expect(4, h + off::FLAGS, 0, "data packet flags");
    g.s.compare_with(d, &msg(HOST_MSG2, 0x44), "the host's answer");
    let mut shut = Header::out(GUEST_LOCAL_PORT, HOST_PORT, OP_SHUTDOWN);
    shut.flags = SHUTDOWN_BOTH;
    shut.fwd_cnt = HOST_MSG2 as u32;
    g.send(shut, None, &[], "close the connection to the host");
    g.receive(OP_RST, 0, Some(HOST_PORT), GUEST_LOCAL_PORT);

    g.s.expect_used_idx(&g.rx, "no further packets");
    g.s.expect_interrupts(dev);
    g.s.print("kiln-vsock: ok\n");
    g.s.end();
    g.s
}

fn read_eof(s: &mut UnixStream, what: &str) -> Result<(), String> {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{what}: {n} more bytes instead of end of stream")),
        Err(e) => Err(format!("{what}: {e} instead of end of stream")),
    }
}

/// The host side of both connections; returns the port named in the OK line.
fn host(uds: &Path, listener: UnixListener) -> Result<u32, String> {
    let timeout = Some(Duration::from_secs(10));
    // Host -> guest.
    let mut c = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
    c.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    c.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    // The OK line, a byte at a time so nothing after it is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match c.read(&mut b) {
            Ok(1) if line.len() < 32 => line.push(b[0]),
            r => return Err(format!("reading OK: {r:?} after {line:?}")),
        }
    }
    let line = String::from_utf8_lossy(&line).to_string();
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .ok_or_else(|| format!("not an OK line: {line:?}"))?;
    c.write_all(&msg(HOST_MSG, 0x11))
        .map_err(|e| format!("send: {e}"))?;
    let mut got = vec![0u8; GUEST_MSG];
    c.read_exact(&mut got)
        .map_err(|e| format!("the guest's answer: {e}"))?;
    if got != msg(GUEST_MSG, 0x22) {
        return Err("the guest's answer differs".into());
    }
    read_eof(&mut c, "after the guest closed")?;

    // Guest -> host.
    let (mut c, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    c.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; GUEST_MSG2];
    c.read_exact(&mut got)
        .map_err(|e| format!("the guest's data: {e}"))?;
    if got != msg(GUEST_MSG2, 0x33) {
        return Err("the guest's data differs".into());
    }
    c.write_all(&msg(HOST_MSG2, 0x44))
        .map_err(|e| format!("answer: {e}"))?;
    read_eof(&mut c, "after the guest closed its connection")?;
    Ok(port)
}

#[test]
fn guest_driver_vsock_connections_both_ways() {
    if !kvm_or_skip("guest_driver_vsock_connections_both_ways") {
        return;
    }
    log_warnings();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let dev = VirtioVsock::new(GUEST_CID, &uds).unwrap();
    let s = script();
    let mut m = start_script(&s, vec![Box::new(dev)]);
    let h = {
        let uds = uds.clone();
        std::thread::spawn(move || host(&uds, listener))
    };
    let console = finish_script(&mut m, &s);
    let port = h.join().unwrap().unwrap();
    assert_eq!(
        console,
        format!("hostport={port:08x}\nkiln-vsock: ok\n"),
        "the port the guest saw is the one in the OK line"
    );
}
