//! The vsock device against a mock guest (virtio-queue's test utilities): every packet type,
//! the host Unix-socket side for real, and each malformed-chain case.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::devices::vsock::connection::TX_BUF_SIZE;
use kiln_vmm::devices::vsock::muxer::unix::guest_port_path;
use kiln_vmm::devices::vsock::protocol::*;
use kiln_vmm::devices::vsock::{VsockConfig, VsockHandler};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::vsock_mock::{add_chain, guest_hdr, make_queue, rx_chain, tx_chain, CID, QSIZE};

const MEM_SIZE: usize = 16 << 20;
const BUF_START: u64 = 0x10_0000;
const RX_DATA: u32 = 4096;
const RX_BUFS: u16 = 64;

#[derive(Debug, Clone)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

/// A guest driver on mock memory, plus the device under test.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rxvq: MockSplitQueue<'a, GuestMemoryMmap>,
    txvq: MockSplitQueue<'a, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    rx_used: GuestAddress,
    tx_used: GuestAddress,
    dev: VsockHandler,
    next_tx_desc: u16,
    next_rx_desc: u16,
    next_buf: u64,
    rx_outstanding: Vec<(u16, u64, u64)>,
    rx_used_seen: u16,
    tx_used_seen: u16,
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap, uds: &Path) -> Self {
        let rxvq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let txvq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
        let (rxq, rx_used) = make_queue(&rxvq);
        let (txq, tx_used) = make_queue(&txvq);
        let dev = VsockHandler::new(VsockConfig::new(CID).expect("cid"), uds).expect("device");
        Guest {
            mem,
            rxvq,
            txvq,
            rxq,
            txq,
            rx_used,
            tx_used,
            dev,
            next_tx_desc: 0,
            next_rx_desc: 0,
            next_buf: BUF_START,
            rx_outstanding: Vec::new(),
            rx_used_seen: 0,
            tx_used_seen: 0,
        }
    }

    fn alloc_buf(&mut self, len: u64) -> u64 {
        if self.next_buf + len + 64 > MEM_SIZE as u64 {
            self.next_buf = BUF_START;
        }
        let at = self.next_buf;
        self.next_buf += (len + 63) & !63;
        at
    }

    fn alloc_descs(next: &mut u16, n: u16) -> u16 {
        if *next + n > QSIZE {
            *next = 0;
        }
        let first = *next;
        *next += n;
        first
    }

    /// Puts raw descriptors on the TX queue (links are the caller's business) and runs TX.
    fn send_raw_tx(&mut self, descs: &[RawDescriptor]) -> u32 {
        let first = Self::alloc_descs(&mut self.next_tx_desc, descs.len() as u16);
        add_chain(&self.txvq, self.mem, descs, first);
        let _ = self.dev.process_tx(self.mem, &mut self.txq);
        self.last_tx_used_len()
    }

    fn last_tx_used_len(&mut self) -> u32 {
        let idx: u16 = self
            .mem
            .read_obj(self.tx_used.unchecked_add(2))
            .expect("used idx");
        let mut len = u32::MAX;
        while self.tx_used_seen != idx {
            let slot = self.tx_used_seen % QSIZE;
            len = self
                .mem
                .read_obj(self.tx_used.unchecked_add(4 + 8 * u64::from(slot) + 4))
                .expect("used len");
            self.tx_used_seen = self.tx_used_seen.wrapping_add(1);
        }
        len
    }

    fn tx_used_count(&self) -> u16 {
        self.mem
            .read_obj(self.tx_used.unchecked_add(2))
            .expect("used idx")
    }

    /// Sends a packet as a Linux guest would: header descriptor, then a data descriptor.
    fn send(&mut self, hdr: Header, data: &[u8]) {
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        let h = self.alloc_buf(HEADER_SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .expect("write header");
        let first = Self::alloc_descs(&mut self.next_tx_desc, 2);
        let d = if data.is_empty() {
            0
        } else {
            let d = self.alloc_buf(data.len() as u64);
            self.mem
                .write_slice(data, GuestAddress(d))
                .expect("write data");
            d
        };
        let descs = tx_chain(h, d, data.len() as u32, first);
        add_chain(&self.txvq, self.mem, &descs, first);
        self.dev
            .process_tx(self.mem, &mut self.txq)
            .expect("process tx");
        self.last_tx_used_len();
    }

    fn post_rx_buffers(&mut self) {
        while (self.rx_outstanding.len() as u16) < RX_BUFS {
            let h = self.alloc_buf(HEADER_SIZE as u64);
            let d = self.alloc_buf(u64::from(RX_DATA));
            let first = Self::alloc_descs(&mut self.next_rx_desc, 2);
            let descs = rx_chain(h, d, RX_DATA, first);
            add_chain(&self.rxvq, self.mem, &descs, first);
            self.rx_outstanding.push((first, h, d));
        }
    }

    /// Runs host events and RX once; returns the packets the device wrote.
    fn pump(&mut self) -> Vec<Pkt> {
        self.post_rx_buffers();
        self.dev.process_host_events();
        self.dev
            .process_rx(self.mem, &mut self.rxq)
            .expect("process rx");
        self.collect_rx()
    }

    fn collect_rx(&mut self) -> Vec<Pkt> {
        let idx: u16 = self
            .mem
            .read_obj(self.rx_used.unchecked_add(2))
            .expect("used idx");
        let mut out = Vec::new();
        while self.rx_used_seen != idx {
            let slot = self.rx_used_seen % QSIZE;
            let base = self.rx_used.unchecked_add(4 + 8 * u64::from(slot));
            let id: u32 = self.mem.read_obj(base).expect("id");
            let len: u32 = self.mem.read_obj(base.unchecked_add(4)).expect("len");
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let pos = self
                .rx_outstanding
                .iter()
                .position(|(head, _, _)| u32::from(*head) == id)
                .expect("used id is one of ours");
            let (_, h, d) = self.rx_outstanding.remove(pos);
            assert!(len as usize >= HEADER_SIZE, "used len {len}");
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(h)).expect("hdr");
            let hdr = Header::from_bytes(&raw);
            assert_eq!(hdr.len as usize, len as usize - HEADER_SIZE);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(d))
                .expect("data");
            out.push(Pkt { hdr, data });
        }
        out
    }

    /// Pumps until a packet matching `f` arrives (other packets are returned too).
    fn pump_until(&mut self, what: &str, f: impl Fn(&Pkt) -> bool) -> (Pkt, Vec<Pkt>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut others = Vec::new();
        loop {
            for p in self.pump() {
                if f(&p) {
                    return (p, others);
                }
                others.push(p);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {others:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    guest_hdr(op, src_port, dst_port, 0)
}

struct Env {
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    Env { _dir: dir, uds }
}

/// Guest connects to host port `port` (a listener must exist); returns the host stream.
fn guest_connect(g: &mut Guest, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
    g.send(hdr(OP_REQUEST, gport, port), &[]);
    let (resp, _) = g.pump_until("RESPONSE", |p| p.hdr.op == OP_RESPONSE);
    assert_eq!(resp.hdr.src_port, port);
    assert_eq!(resp.hdr.dst_port, gport);
    assert_eq!(resp.hdr.dst_cid, CID);
    assert_eq!(resp.hdr.src_cid, HOST_CID);
    assert_eq!(resp.hdr.buf_alloc, TX_BUF_SIZE);
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    g.send(hdr(OP_REQUEST, 40, 5000), &[]);
    let pkts = g.pump();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5000, 40));
    assert_eq!(g.dev.muxer().num_connections(), 0);
}

#[test]
fn guest_connect_reaches_host_listener_and_data_flows_both_ways() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 1234)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut s = guest_connect(&mut g, &l, 40, 1234);

    g.send(hdr(OP_RW, 40, 1234), b"hello host");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).expect("host reads");
    assert_eq!(&got, b"hello host");

    s.write_all(b"hello guest").expect("host writes");
    let (p, _) = g.pump_until("RW", |p| p.hdr.op == OP_RW);
    assert_eq!(p.data, b"hello guest");
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (1234, 40));
    assert_eq!(p.hdr.fwd_cnt, 10, "device reports the bytes it forwarded");
}

#[test]
fn host_connect_handshake_gets_ok_with_local_port() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    let mut s = UnixStream::connect(&e.uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"CONNECT 1024\nearly data").expect("write");
    let (req, _) = g.pump_until("REQUEST", |p| p.hdr.op == OP_REQUEST);
    assert_eq!(req.hdr.dst_port, 1024);
    assert!(req.hdr.src_port >= 1 << 30, "host ports are allocated high");
    let lp = req.hdr.src_port;
    g.send(hdr(OP_RESPONSE, 1024, lp), &[]);
    let expect = format!("OK {lp}\n");
    let mut got = vec![0u8; expect.len()];
    s.read_exact(&mut got).expect("OK line");
    assert_eq!(String::from_utf8_lossy(&got), expect);
    // Data the host sent right after its CONNECT line reaches the guest.
    let (p, _) = g.pump_until("RW", |p| p.hdr.op == OP_RW);
    assert_eq!(p.data, b"early data");
    // And the other way.
    g.send(hdr(OP_RW, 1024, lp), b"pong");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).expect("pong");
    assert_eq!(&got, b"pong");
}

#[test]
fn host_connect_refused_by_guest_closes_stream_without_ok() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    let mut s = UnixStream::connect(&e.uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"CONNECT 1024\n").expect("write");
    let (req, _) = g.pump_until("REQUEST", |p| p.hdr.op == OP_REQUEST);
    g.send(hdr(OP_RST, 1024, req.hdr.src_port), &[]);
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).expect("eof");
    assert_eq!(n, 0, "no OK for a refused connection: {buf:?}");
    assert_eq!(g.dev.muxer().num_connections(), 0);
}

#[test]
fn host_connect_times_out_when_guest_never_answers() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    let mut s = UnixStream::connect(&e.uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"CONNECT 1024\n").expect("write");
    let start = Instant::now();
    let (req, _) = g.pump_until("RST after timeout", |p| p.hdr.op == OP_RST);
    assert_eq!(req.hdr.dst_port, 1024);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    let mut buf = Vec::new();
    assert_eq!(s.read_to_end(&mut buf).expect("eof"), 0);
}

#[test]
fn host_connect_times_out_while_guest_has_no_rx_buffers() {
    // A guest still booting: no RX buffers, so the REQUEST never leaves the device.
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    let mut s = UnixStream::connect(&e.uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"CONNECT 1024\n").expect("write");
    let start = Instant::now();
    s.set_nonblocking(true).expect("nb");
    let mut buf = [0u8; 8];
    loop {
        g.dev.process_host_events();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("unexpected reply {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5), "not closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(start.elapsed() >= Duration::from_millis(1500));
    assert_eq!(g.dev.muxer().num_connections(), 0);
    // When the guest's driver comes up it is not sent an RST for a REQUEST it never saw.
    assert!(g.pump().is_empty());
}

#[test]
fn bad_handshakes_are_closed() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    for line in [&b"HELLO\n"[..], b"CONNECT abc\n", &[b'C'; 100]] {
        let mut s = UnixStream::connect(&e.uds).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(line).expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 16];
        s.set_nonblocking(true).expect("nb");
        loop {
            assert!(g.pump().is_empty(), "no packet for a bad handshake");
            match s.read(&mut buf) {
                // Closed: end of file, or a reset because the device left unread bytes.
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Ok(n) => panic!("unexpected reply {:?}", &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(
                Instant::now() < deadline,
                "bad handshake not closed: {line:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn clean_shutdown_both_ways() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 77)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);

    // Host closes first: guest gets SHUTDOWN(SEND) after the data; then the guest closes.
    let mut s = guest_connect(&mut g, &l, 41, 77);
    s.write_all(b"last words").expect("write");
    drop(s);
    let (sd, before) = g.pump_until("SHUTDOWN", |p| p.hdr.op == OP_SHUTDOWN);
    assert_eq!(
        before
            .iter()
            .map(|p| p.data.clone())
            .collect::<Vec<_>>()
            .concat(),
        b"last words"
    );
    assert_eq!(sd.hdr.flags, SHUTDOWN_SEND);
    let mut h = hdr(OP_SHUTDOWN, 41, 77);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(h, &[]);
    let (rst, _) = g.pump_until("RST", |p| p.hdr.op == OP_RST);
    assert_eq!(rst.hdr.dst_port, 41);
    assert_eq!(g.dev.muxer().num_connections(), 0);

    // Guest closes first: the host reads the data, then end of file.
    let mut s = guest_connect(&mut g, &l, 42, 77);
    g.send(hdr(OP_RW, 42, 77), b"bye");
    g.send(h_with_ports(h, 42, 77), &[]);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read to eof");
    assert_eq!(buf, b"bye");
    let (rst, _) = g.pump_until("RST", |p| p.hdr.op == OP_RST);
    assert_eq!(rst.hdr.dst_port, 42);
}

fn h_with_ports(mut h: Header, src: u32, dst: u32) -> Header {
    h.src_port = src;
    h.dst_port = dst;
    h
}

#[test]
fn guest_half_close_keeps_host_to_guest_direction() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 78)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut s = guest_connect(&mut g, &l, 43, 78);
    g.send(hdr(OP_RW, 43, 78), b"request");
    let mut h = hdr(OP_SHUTDOWN, 43, 78);
    h.flags = SHUTDOWN_SEND;
    g.send(h, &[]);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("host sees EOF after the request");
    assert_eq!(buf, b"request");
    s.write_all(b"response").expect("host still writes");
    let (p, _) = g.pump_until("RW", |p| p.hdr.op == OP_RW);
    assert_eq!(p.data, b"response");
}

#[test]
fn guest_rst_closes_host_stream() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 79)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut s = guest_connect(&mut g, &l, 44, 79);
    g.send(hdr(OP_RST, 44, 79), &[]);
    let mut buf = Vec::new();
    assert_eq!(s.read_to_end(&mut buf).expect("eof"), 0);
    assert_eq!(g.dev.muxer().num_connections(), 0);
    assert!(g.pump().is_empty(), "no reply to an RST");
}

#[test]
fn credit_is_respected_and_updated() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 80)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut s = guest_connect(&mut g, &l, 45, 80);

    // Host -> guest: the device never sends more than the guest's buf_alloc.
    let mut h = hdr(OP_CREDIT_UPDATE, 45, 80);
    h.buf_alloc = 1000;
    g.send(h, &[]);
    s.write_all(&[9u8; 5000]).expect("write");
    let mut got = 0usize;
    for _ in 0..20 {
        got += g.pump().iter().map(|p| p.data.len()).sum::<usize>();
    }
    assert_eq!(got, 1000, "stopped at the guest's credit");
    let mut h = hdr(OP_CREDIT_UPDATE, 45, 80);
    h.buf_alloc = 1000;
    h.fwd_cnt = 1000;
    g.send(h, &[]);
    for _ in 0..20 {
        got += g.pump().iter().map(|p| p.data.len()).sum::<usize>();
    }
    assert_eq!(got, 2000, "resumed after the guest's credit update");

    // Guest -> host: fill the device buffer while the host does not read; once the host
    // reads, the device volunteers a credit update.
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0usize;
    while sent + chunk.len() <= TX_BUF_SIZE as usize {
        g.send(hdr(OP_RW, 45, 80), &chunk);
        sent += chunk.len();
    }
    // Whatever the host socket took at once already counts as forwarded.
    let mut updates = Vec::new();
    for p in g.pump() {
        assert_ne!(p.hdr.op, OP_RST);
        if p.hdr.op == OP_CREDIT_UPDATE {
            updates.push(p.hdr.fwd_cnt);
        }
    }
    // The device flushes as the host reads; pump both until everything arrived.
    s.set_nonblocking(true).expect("nb");
    let mut drained = 0usize;
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while drained < sent {
        match s.read(&mut sink) {
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        for p in g.pump() {
            assert_ne!(p.hdr.op, OP_RST);
            if p.hdr.op == OP_CREDIT_UPDATE {
                updates.push(p.hdr.fwd_cnt);
            }
        }
        assert!(
            Instant::now() < deadline,
            "host drained {drained} of {sent}"
        );
    }
    for p in g.pump() {
        if p.hdr.op == OP_CREDIT_UPDATE {
            updates.push(p.hdr.fwd_cnt);
        }
    }
    assert!(
        !updates.is_empty(),
        "the device volunteered credit once space was freed"
    );
    let last = *updates.last().expect("update") as usize;
    assert!(
        last + (TX_BUF_SIZE as usize) / 2 >= sent,
        "guest told about most of the freed space: {updates:?} of {sent}"
    );

    // A guest that ignores credit gets RST (the host no longer reads).
    let mut sent = 0usize;
    let mut rst = false;
    while sent <= 64 << 20 {
        g.send(hdr(OP_RW, 45, 80), &chunk);
        sent += chunk.len();
        if g.pump().iter().any(|p| p.hdr.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "credit violation must reset the connection");
    assert_eq!(g.dev.muxer().num_connections(), 0);
}

#[test]
fn credit_request_is_answered() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 81)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let _s = guest_connect(&mut g, &l, 46, 81);
    g.send(hdr(OP_CREDIT_REQUEST, 46, 81), &[]);
    let (p, _) = g.pump_until("CREDIT_UPDATE", |p| p.hdr.op == OP_CREDIT_UPDATE);
    assert_eq!(p.hdr.buf_alloc, TX_BUF_SIZE);
}

#[test]
fn reset_closes_every_host_connection() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 82)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut streams: Vec<UnixStream> = (0..5)
        .map(|i| guest_connect(&mut g, &l, 100 + i, 82))
        .collect();
    assert_eq!(g.dev.muxer().num_connections(), 5);
    g.dev.reset();
    assert_eq!(g.dev.muxer().num_connections(), 0);
    for s in &mut streams {
        let mut buf = Vec::new();
        assert_eq!(s.read_to_end(&mut buf).expect("eof"), 0);
    }
    // Serving again afterwards.
    let _s = guest_connect(&mut g, &l, 200, 82);
}

#[test]
fn many_connections_at_once() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 83)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let mut streams: Vec<(u32, UnixStream)> = (0..32)
        .map(|i| (300 + i, guest_connect(&mut g, &l, 300 + i, 83)))
        .collect();
    for (port, s) in &mut streams {
        s.write_all(format!("to {port}").as_bytes()).expect("write");
    }
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < streams.len() {
        for p in g.pump() {
            if p.hdr.op == OP_RW {
                seen.insert(p.hdr.dst_port, p.data);
            }
        }
        assert!(Instant::now() < deadline, "only {} of 32", seen.len());
    }
    for (port, s) in &mut streams {
        assert_eq!(seen[port], format!("to {port}").as_bytes());
        g.send(hdr(OP_RW, *port, 83), format!("from {port}").as_bytes());
        let mut buf = vec![0u8; format!("from {port}").len()];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(buf, format!("from {port}").as_bytes());
    }
}

#[test]
fn packets_for_unknown_connections_and_bad_addresses() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    // Data for a connection that does not exist: RST.
    g.send(hdr(OP_RW, 50, 60), b"x");
    let p = g.pump();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].hdr.op, OP_RST);
    // An RST for an unknown connection: silence.
    g.send(hdr(OP_RST, 50, 60), &[]);
    assert!(g.pump().is_empty());
    // Spoofed source CID: dropped.
    let mut h = hdr(OP_REQUEST, 50, 60);
    h.src_cid = 99;
    g.send(h, &[]);
    assert!(g.pump().is_empty());
    // A CID other than the host: RST from that CID.
    let mut h = hdr(OP_REQUEST, 50, 60);
    h.dst_cid = 7;
    g.send(h, &[]);
    let p = g.pump();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].hdr.op, p[0].hdr.src_cid), (OP_RST, 7));
    // SEQPACKET is not offered: RST.
    let mut h = hdr(OP_REQUEST, 50, 60);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(g.pump()[0].hdr.op, OP_RST);
    // Unknown op on a live connection: RST and the connection is gone.
    let l = UnixListener::bind(guest_port_path(&e.uds, 84)).expect("bind");
    let _s = guest_connect(&mut g, &l, 51, 84);
    g.send(hdr(42, 51, 84), &[]);
    assert_eq!(g.pump()[0].hdr.op, OP_RST);
    assert_eq!(g.dev.muxer().num_connections(), 0);
}

// ------------------------------------------------------------------ malformed chains

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// After each malformed chain the device must still serve a well-formed connection (which
/// the guest then resets, leaving nothing behind).
fn still_works(g: &mut Guest, l: &UnixListener, gport: u32) {
    let _s = guest_connect(g, l, gport, 85);
    g.send(hdr(OP_RST, gport, 85), &[]);
    assert_eq!(g.dev.muxer().num_connections(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_and_logged() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 85)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    let h = g.alloc_buf(64);
    m.write_slice(&hdr(OP_REQUEST, 1, 85).to_bytes(), GuestAddress(h))
        .expect("hdr");
    let mut rw = hdr(OP_RW, 1, 85);
    rw.len = 100;
    let hrw = g.alloc_buf(64);
    m.write_slice(&rw.to_bytes(), GuestAddress(hrw))
        .expect("hdr");
    let mut huge = hdr(OP_RW, 1, 85);
    huge.len = u32::MAX;
    let hhuge = g.alloc_buf(64);
    m.write_slice(&huge.to_bytes(), GuestAddress(hhuge))
        .expect("hdr");

    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "write-only header",
            vec![desc(h, 44, VRING_DESC_F_WRITE, 0)],
        ),
        ("header too short", vec![desc(h, 20, 0, 0)]),
        (
            "header outside memory",
            vec![desc(MEM_SIZE as u64 + 0x1000, 44, 0, 0)],
        ),
        (
            "header straddling the end of memory",
            vec![desc(MEM_SIZE as u64 - 10, 44, 0, 0)],
        ),
        ("address overflow", vec![desc(u64::MAX - 5, 44, 0, 0)]),
        ("data descriptor missing", vec![desc(hrw, 44, 0, 0)]),
        ("data descriptor too short", {
            let first = 0; // patched below
            vec![
                desc(hrw, 44, VRING_DESC_F_NEXT, first + 1),
                desc(h, 10, 0, 0),
            ]
        }),
        (
            "write-only data",
            vec![
                desc(hrw, 44, VRING_DESC_F_NEXT, 1),
                desc(h, 200, VRING_DESC_F_WRITE, 0),
            ],
        ),
        (
            "data outside memory",
            vec![
                desc(hrw, 44, VRING_DESC_F_NEXT, 1),
                desc(MEM_SIZE as u64, 200, 0, 0),
            ],
        ),
        (
            "absurd len",
            vec![
                desc(hhuge, 44, VRING_DESC_F_NEXT, 1),
                desc(h, u32::MAX, 0, 0),
            ],
        ),
        (
            "next out of table",
            vec![desc(hrw, 44, VRING_DESC_F_NEXT, 5000)],
        ),
        ("descriptor loop", vec![desc(hrw, 44, VRING_DESC_F_NEXT, 0)]),
    ];
    let mut gport = 1000;
    for (name, mut descs) in cases {
        // Chain links are relative to where the chain lands in the table.
        let first = if g.next_tx_desc + descs.len() as u16 > QSIZE {
            0
        } else {
            g.next_tx_desc
        };
        for d in &mut descs {
            let sd = SplitDescriptor::from(*d);
            if sd.flags() & VRING_DESC_F_NEXT as u16 != 0 && sd.next() < 16 {
                let next = if name == "descriptor loop" {
                    first
                } else {
                    first + sd.next()
                };
                *d = desc(sd.addr().0, sd.len(), u32::from(sd.flags()), next);
            }
        }
        let before = g.tx_used_count();
        let used_len = g.send_raw_tx(&descs);
        assert_eq!(
            g.tx_used_count(),
            before.wrapping_add(1),
            "{name}: chain returned"
        );
        assert_eq!(used_len, 0, "{name}");
        assert!(
            !g.dev.is_broken(),
            "{name}: a bad chain must not break the queue"
        );
        assert!(
            g.pump().is_empty(),
            "{name}: nothing sent for a dropped chain"
        );
        gport += 1;
        still_works(&mut g, &l, gport);
    }
}

#[test]
fn malformed_rx_chains_are_returned_and_logged() {
    let w = VRING_DESC_F_WRITE;
    let wn = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("read-only header", vec![desc(BUF_START, 44, 0, 0)]),
        ("header too short", vec![desc(BUF_START, 8, w, 0)]),
        ("header outside memory", vec![desc(1 << 40, 44, w, 0)]),
        ("header only, no data", vec![desc(BUF_START, 44, w, 0)]),
        (
            "data too long",
            vec![
                desc(BUF_START, 44, wn, 1),
                desc(BUF_START + 64, u32::MAX, w, 0),
            ],
        ),
        (
            "read-only data",
            vec![desc(BUF_START, 44, wn, 1), desc(BUF_START + 64, 100, 0, 0)],
        ),
        (
            "data outside memory",
            vec![
                desc(BUF_START, 44, wn, 1),
                desc(MEM_SIZE as u64 - 8, 100, w, 0),
            ],
        ),
        ("next out of table", vec![desc(BUF_START, 44, wn, 999)]),
    ];
    for (name, descs) in cases {
        let e = env();
        let m = mem();
        let l = UnixListener::bind(guest_port_path(&e.uds, 85)).expect("bind");
        let mut g = Guest::new(&m, &e.uds);
        // The device takes RX buffers only when it has something to send: make it owe an RST.
        g.send(hdr(OP_RW, 1, 9999), b"x");
        add_chain(&g.rxvq, &m, &descs, 0);
        g.next_rx_desc = descs.len() as u16;
        g.dev.process_rx(&m, &mut g.rxq).expect("rx");
        let idx: u16 = m.read_obj(g.rx_used.unchecked_add(2)).expect("idx");
        assert_eq!(idx, 1, "{name}: the bad chain was returned");
        let base = g.rx_used.unchecked_add(4);
        let id: u32 = m.read_obj(base).expect("id");
        let len: u32 = m.read_obj(base.unchecked_add(4)).expect("len");
        assert_eq!((id, len), (0, 0), "{name}");
        g.rx_used_seen = 1;
        assert!(!g.dev.is_broken(), "{name}");
        // The RST is still owed and goes out in the next good buffer.
        let p = g.pump();
        assert!(p.iter().any(|p| p.hdr.op == OP_RST), "{name}: {p:?}");
        still_works(&mut g, &l, 2000);
    }
}

#[test]
fn out_of_range_head_in_avail_ring_breaks_queue() {
    let e = env();
    let m = mem();
    let mut g = Guest::new(&m, &e.uds);
    // An avail entry naming descriptor 300 of a 256-entry table.
    let idx_at = g.txvq.avail_addr().unchecked_add(2);
    m.write_obj(300u16, g.txvq.avail_addr().unchecked_add(4))
        .expect("slot");
    m.write_obj(1u16, idx_at).expect("idx");
    assert!(g.dev.process_tx(&m, &mut g.txq).is_err());
    assert!(g.dev.is_broken());
}

#[test]
fn absurd_avail_index_breaks_queue_until_reset() {
    let e = env();
    let m = mem();
    let l = UnixListener::bind(guest_port_path(&e.uds, 85)).expect("bind");
    let mut g = Guest::new(&m, &e.uds);
    // The driver claims 1000 new entries in a 256-entry queue.
    m.write_obj(1000u16, g.txvq.avail_addr().unchecked_add(2))
        .expect("idx");
    assert!(g.dev.process_tx(&m, &mut g.txq).is_err());
    assert!(g.dev.is_broken());
    // Broken until the driver resets the device (and its queues).
    assert!(matches!(g.dev.process_tx(&m, &mut g.txq), Ok(false)));
    g.dev.reset();
    // The driver re-initialises the queue: rings zeroed, fresh queue state.
    m.write_obj(0u16, g.txvq.avail_addr().unchecked_add(2))
        .expect("idx");
    m.write_obj(0u16, g.tx_used.unchecked_add(2)).expect("idx");
    let (txq, _) = make_queue(&g.txvq);
    g.txq = txq;
    g.tx_used_seen = 0;
    g.next_tx_desc = 0;
    assert!(!g.dev.is_broken());
    still_works(&mut g, &l, 3000);
}
