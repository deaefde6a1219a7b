//! vsock on kiln's in-process virtio transport: `VirtioVsock` activated with mock queues and
//! real eventfds. The test plays the guest driver: it writes chains, kicks, and waits for
//! the device's interrupt; host programs use the Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_vmm::devices::vsock::device::VIRTIO_ID_VSOCK;
use kiln_vmm::devices::vsock::muxer::unix::guest_port_path;
use kiln_vmm::devices::vsock::protocol::*;
use kiln_vmm::devices::vsock::VirtioVsock;
use kiln_vmm::transport::{ActivateContext, DeviceQueue, Interrupt, VirtioDevice};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CID: u64 = 5;
const QSIZE: u16 = 64;
const BUFS: u64 = 0x10_0000;

/// One split ring laid out at `base`: descriptors, avail at +0x1000, used at +0x2000.
struct Ring {
    base: u64,
    kick: EventFd,
    used_seen: u16,
    next_desc: u16,
}

impl Ring {
    fn new(base: u64) -> Self {
        Ring {
            base,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            used_seen: 0,
            next_desc: 0,
        }
    }
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(self.base))
            .expect("desc");
        q.try_set_avail_ring_address(GuestAddress(self.base + 0x1000))
            .expect("avail");
        q.try_set_used_ring_address(GuestAddress(self.base + 0x2000))
            .expect("used");
        q.set_ready(true);
        q
    }
    fn device_queue(&self, index: u16) -> DeviceQueue {
        DeviceQueue {
            index,
            queue: self.queue(),
            kick: self.kick.try_clone().expect("clone"),
        }
    }
    fn add(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u32)]) -> u16 {
        if self.next_desc + descs.len() as u16 > QSIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let i = first + i as u16;
            let (flags, next) = if (i - first) as usize + 1 < descs.len() {
                (*flags | VRING_DESC_F_NEXT, i + 1)
            } else {
                (*flags, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags as u16, next));
            mem.write_obj(d, GuestAddress(self.base + 16 * u64::from(i)))
                .expect("desc");
        }
        self.next_desc += descs.len() as u16;
        let idx_at = GuestAddress(self.base + 0x1002);
        let idx: u16 = mem.read_obj(idx_at).expect("idx");
        mem.write_obj(
            first,
            GuestAddress(self.base + 0x1004 + 2 * u64::from(idx % QSIZE)),
        )
        .expect("slot");
        mem.write_obj(idx.wrapping_add(1), idx_at).expect("idx");
        self.kick.write(1).expect("kick");
        first
    }
    /// New used entries: (head, len).
    fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x2002)).expect("idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = GuestAddress(self.base + 0x2004 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = mem.read_obj(at).expect("id");
            let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("len");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    ev: Ring,
    irq: EventFd,
    rx_bufs: Vec<(u16, u64)>,
    next_buf: u64,
}

impl Guest {
    fn new() -> Self {
        Guest {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem"),
            rx: Ring::new(0),
            tx: Ring::new(0x1_0000),
            ev: Ring::new(0x2_0000),
            irq: EventFd::new(EFD_NONBLOCK).expect("irq"),
            rx_bufs: Vec::new(),
            next_buf: BUFS,
        }
    }
    fn ctx(&self) -> ActivateContext {
        ActivateContext {
            mem: self.mem.clone(),
            acked_features: 0,
            queues: vec![
                self.rx.device_queue(0),
                self.tx.device_queue(1),
                self.ev.device_queue(2),
            ],
            interrupt: Arc::new(Interrupt::new(self.irq.try_clone().expect("irq"))),
        }
    }
    fn buf(&mut self) -> u64 {
        let b = self.next_buf;
        self.next_buf += 0x2000;
        b
    }
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let b = self.buf();
            let head = self.rx.add(
                &self.mem,
                &[
                    (b, HEADER_SIZE as u32, VRING_DESC_F_WRITE),
                    (b + 64, 4096, VRING_DESC_F_WRITE),
                ],
            );
            self.rx_bufs.push((head, b));
        }
    }
    fn send(&mut self, h: Header, data: &[u8]) {
        let mut h = h;
        h.len = data.len() as u32;
        let b = self.buf();
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(b))
            .expect("hdr");
        self.mem
            .write_slice(data, GuestAddress(b + 64))
            .expect("data");
        if data.is_empty() {
            self.tx.add(&self.mem, &[(b, HEADER_SIZE as u32, 0)]);
        } else {
            self.tx.add(
                &self.mem,
                &[(b, HEADER_SIZE as u32, 0), (b + 64, data.len() as u32, 0)],
            );
        }
    }
    /// Waits for the interrupt and a packet matching `f` on the RX queue.
    fn wait_rx(&mut self, what: &str, f: impl Fn(&Header, &[u8]) -> bool) -> Header {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (head, len) in self.rx.used(&self.mem) {
                let pos = self
                    .rx_bufs
                    .iter()
                    .position(|(h, _)| *h == head)
                    .expect("our buffer");
                let (_, b) = self.rx_bufs.remove(pos);
                let mut raw = [0u8; HEADER_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(b)).expect("hdr");
                let h = Header::from_bytes(&raw);
                let mut data = vec![0u8; len as usize - HEADER_SIZE];
                self.mem
                    .read_slice(&mut data, GuestAddress(b + 64))
                    .expect("data");
                if f(&h, &data) {
                    return h;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

#[test]
fn virtio_vsock_serves_kicks_and_host_sockets_and_survives_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let l = UnixListener::bind(guest_port_path(&uds, 1234)).expect("bind");
    let mut dev = VirtioVsock::new(CID, &uds).expect("device");
    assert_eq!(dev.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);

    let mut g = Guest::new();
    g.post_rx(8);
    dev.activate(g.ctx()).expect("activate");

    // Guest -> host, driven by TX kicks.
    g.send(hdr(OP_REQUEST, 40, 1234), &[]);
    g.wait_rx("RESPONSE", |h, _| h.op == OP_RESPONSE);
    assert!(g.interrupted(), "the device raised the interrupt");
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    g.send(hdr(OP_RW, 40, 1234), b"hi host");
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).expect("host reads");
    assert_eq!(&buf, b"hi host");

    // Host -> guest, driven by host socket readiness alone (no guest kick).
    g.post_rx(4);
    s.write_all(b"hi guest").expect("write");
    g.wait_rx("RW", |h, d| h.op == OP_RW && d == b"hi guest");

    // A host CONNECT reaches the guest as a REQUEST.
    let mut c = UnixStream::connect(&uds).expect("connect");
    c.write_all(b"CONNECT 77\n").expect("handshake");
    let req = g.wait_rx("REQUEST", |h, _| h.op == OP_REQUEST && h.dst_port == 77);
    g.send(hdr(OP_RESPONSE, 77, req.src_port), &[]);
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let expect = format!("OK {}\n", req.src_port);
    let mut ok = vec![0u8; expect.len()];
    c.read_exact(&mut ok).expect("OK");
    assert_eq!(String::from_utf8_lossy(&ok), expect);

    // Driver reset: every host connection is closed.
    dev.reset();
    for s in [&mut s, &mut c] {
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).expect("eof"), 0);
    }

    // The driver sets the device up again: it serves as before.
    let mut g = Guest::new();
    g.post_rx(8);
    dev.activate(g.ctx()).expect("re-activate");
    g.send(hdr(OP_REQUEST, 41, 1234), &[]);
    g.wait_rx("RESPONSE", |h, _| h.op == OP_RESPONSE && h.dst_port == 41);
}

#[test]
fn activation_without_rx_and_tx_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = VirtioVsock::new(CID, &dir.path().join("v.sock")).expect("device");
    let g = Guest::new();
    let mut ctx = g.ctx();
    ctx.queues.truncate(1);
    assert!(dev.activate(ctx).is_err());
    // Still usable with proper queues afterwards.
    dev.activate(g.ctx()).expect("activate");
}
