//! vsock throughput, two ways:
//!
//! - `device`: the device logic alone. A mock guest driver (virtio-queue's test utilities)
//!   drives kiln's vsock handler in this process, with 4 KiB RX buffers as Linux uses and
//!   64 KiB TX packets, honouring credit both ways; a host thread talks on the
//!   Firecracker-style Unix socket. Measures host -> guest and guest -> host MiB/s.
//! - `qemu`: a real Linux guest (Debian cloud kernel, TCG) on kiln's vhost-user-vsock
//!   backend; the host pushes data through the guest's echo service over several connections
//!   at once. TCG emulates the guest CPU, so this measures the whole path at TCG speed.
//!
//! `cargo bench -p kiln-vmm --bench vsock_bench [-- device|qemu|all] [MIB]`

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_vmm::devices::vsock::muxer::unix::guest_port_path;
use kiln_vmm::devices::vsock::protocol::*;
use kiln_vmm::devices::vsock::{VsockConfig, VsockHandler};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

// The mock guest's queue plumbing, shared with the vsock queue tests.
#[path = "../tests/it/vsock_guest/mod.rs"]
mod vsock_guest;
#[path = "../tests/it/vsock_mock/mod.rs"]
mod vsock_mock;
use vsock_mock::{
    add_chain, guest_hdr, make_queue, rx_chain, tx_chain, CID, GUEST_BUF_ALLOC, QSIZE,
};

const RX_BUF: u32 = 4096;
const TX_PKT: usize = 64 * 1024;

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    rxvq: MockSplitQueue<'a, GuestMemoryMmap>,
    txvq: MockSplitQueue<'a, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    rx_used: GuestAddress,
    dev: VsockHandler,
    rx_used_seen: u16,
}

const RX_HDR_BASE: u64 = 0x10_0000;
const RX_DATA_BASE: u64 = 0x20_0000;
const TX_HDR: u64 = 0x80_0000;
const TX_DATA: u64 = 0x81_0000;

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, uds: &Path) -> Self {
        let rxvq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let txvq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
        let (rxq, rx_used) = make_queue(&rxvq);
        let (txq, _) = make_queue(&txvq);
        let dev = VsockHandler::new(VsockConfig::new(CID).expect("cid"), uds).expect("device");
        let mut d = Driver {
            mem,
            rxvq,
            txvq,
            rxq,
            txq,
            rx_used,
            dev,
            rx_used_seen: 0,
        };
        for i in 0..QSIZE / 2 {
            d.post_rx(i * 2);
        }
        d
    }

    fn post_rx(&mut self, head: u16) {
        let slot = u64::from(head / 2);
        let descs = rx_chain(
            RX_HDR_BASE + slot * 64,
            RX_DATA_BASE + slot * u64::from(RX_BUF),
            RX_BUF,
            head,
        );
        add_chain(&self.rxvq, self.mem, &descs, head);
    }

    /// Runs the device once; calls `f(header, data_len)` for each packet it delivered, with
    /// the buffer re-posted afterwards (the guest consumed it).
    fn pump(&mut self, mut f: impl FnMut(&Header, usize)) {
        self.dev.process_host_events();
        self.dev.process_rx(self.mem, &mut self.rxq).expect("rx");
        let used = self.rx_used;
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("idx");
        while self.rx_used_seen != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.rx_used_seen % QSIZE));
            let id: u32 = self.mem.read_obj(at).expect("id");
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("len");
            let mut raw = [0u8; HEADER_SIZE];
            let slot = u64::from(id / 2);
            self.mem
                .read_slice(&mut raw, GuestAddress(RX_HDR_BASE + slot * 64))
                .expect("hdr");
            f(
                &Header::from_bytes(&raw),
                (len as usize).saturating_sub(HEADER_SIZE),
            );
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            self.post_rx(id as u16);
        }
    }

    fn send(&mut self, hdr: Header, len: usize) {
        let mut hdr = hdr;
        hdr.len = len as u32;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_HDR))
            .expect("hdr");
        let descs = tx_chain(TX_HDR, TX_DATA, len as u32, 0);
        add_chain(&self.txvq, self.mem, &descs, 0);
        self.dev.process_tx(self.mem, &mut self.txq).expect("tx");
    }
}

fn device_bench(total: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
    let mut d = Driver::new(&mem, &uds);
    mem.write_slice(&vec![0x5au8; TX_PKT], GuestAddress(TX_DATA))
        .expect("data");

    // Host -> guest: the host connects with CONNECT, then streams `total` bytes.
    let uds2 = uds.clone();
    let host = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&uds2).expect("connect");
        s.write_all(b"CONNECT 1024\n").expect("handshake");
        let mut b = [0u8; 1];
        let mut line = Vec::new();
        while s.read(&mut b).expect("ok") == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        assert!(line.starts_with(b"OK "), "bad reply {line:?}");
        let chunk = vec![0xa5u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
    });
    let mut lport = None;
    while lport.is_none() {
        d.pump(|h, _| {
            if h.op == OP_REQUEST {
                lport = Some(h.src_port);
            }
        });
    }
    let lport = lport.expect("request");
    d.send(guest_hdr(OP_RESPONSE, 1024, lport, 0), 0);
    let start = Instant::now();
    let mut got = 0usize;
    let mut told = 0usize;
    while got < total {
        d.pump(|h, n| {
            if h.op == OP_RW {
                got += n;
            }
        });
        // Like Linux: tell the device about consumed bytes once a good part of the buffer
        // has been freed.
        if got - told >= (GUEST_BUF_ALLOC / 2) as usize {
            d.send(guest_hdr(OP_CREDIT_UPDATE, 1024, lport, got as u32), 0);
            told = got;
        }
    }
    let h2g = start.elapsed().as_secs_f64();
    host.join().expect("host");

    // Guest -> host: the guest connects to port 5000, the host listener drains.
    let l = UnixListener::bind(guest_port_path(&uds, 5000)).expect("bind");
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    });
    d.send(guest_hdr(OP_REQUEST, 2000, 5000, 0), 0);
    let mut peer_alloc = 0u32;
    let mut peer_fwd = 0u32;
    let mut established = false;
    while !established {
        d.pump(|h, _| {
            if h.op == OP_RESPONSE {
                established = true;
                peer_alloc = h.buf_alloc;
                peer_fwd = h.fwd_cnt;
            }
        });
    }
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < total {
        let credit = peer_alloc as usize - (sent - peer_fwd as usize);
        let n = credit.min(TX_PKT).min(total - sent);
        if n > 0 {
            d.send(guest_hdr(OP_RW, 2000, 5000, 0), n);
            sent += n;
        }
        d.pump(|h, _| {
            peer_alloc = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
        });
    }
    let mut h = guest_hdr(OP_SHUTDOWN, 2000, 5000, 0);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    d.send(h, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sink.is_finished() && Instant::now() < deadline {
        d.pump(|_, _| {});
    }
    let drained = sink.join().expect("sink");
    let g2h = start.elapsed().as_secs_f64();
    assert_eq!(drained, total, "host received everything");
    let mib = total as f64 / (1 << 20) as f64;
    println!(
        "device  host->guest: {mib:.0} MiB in {h2g:.3} s = {:.0} MiB/s (4 KiB RX buffers)",
        mib / h2g
    );
    println!(
        "device  guest->host: {mib:.0} MiB in {g2h:.3} s = {:.0} MiB/s (64 KiB TX packets)",
        mib / g2h
    );
}

// ------------------------------------------------------------------ real guest (TCG)

const INIT: &str = r#"
/vsock-helper listen 1024
"#;

fn qemu_bench(mib: usize) {
    use kiln_e2e::initramfs::Initramfs;
    use kiln_e2e::kernel::guest_kernel;
    use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
    if !qemu_available() {
        println!("qemu    SKIP: qemu-system-x86_64 is not installed");
        return;
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => {
            println!("qemu    SKIP: cannot get the Debian cloud kernel: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let helper = dir.path().join("vsock-helper");
    if let Err(e) = vsock_guest::build_helper(&helper) {
        println!("qemu    SKIP: cannot build the static guest helper: {e}");
        return;
    }
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("vmw_vsock_virtio_transport")
        .file(
            "/vsock-helper",
            std::fs::read(&helper).expect("helper"),
            0o755,
        )
        .init_script(INIT)
        .build(&initrd)
        .expect("initramfs");
    let sock = dir.path().join("vsock.vhost");
    let uds = dir.path().join("vsock.sock");
    let handle = kiln_vmm::devices::vsock::spawn(&sock, &uds, CID).expect("backend");
    let cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log")).arg([
        "-chardev".to_string(),
        format!("socket,id=vs,path={}", sock.display()),
        "-device".to_string(),
        "vhost-user-vsock-pci,chardev=vs".to_string(),
    ]);
    let mut vm = Qemu::spawn(&cfg).expect("qemu");
    vm.wait_for("VSOCK-LISTENING", Duration::from_secs(120))
        .expect("guest up");
    for conns in [1usize, 4] {
        let per = (mib << 20) / conns;
        let start = Instant::now();
        let workers: Vec<_> = (0..conns)
            .map(|_| {
                let uds = uds.clone();
                std::thread::spawn(move || {
                    let mut s = UnixStream::connect(&uds).expect("connect");
                    s.write_all(b"CONNECT 1024\n").expect("handshake");
                    let mut b = [0u8; 1];
                    while s.read(&mut b).expect("ok") == 1 && b[0] != b'\n' {}
                    let mut w = s.try_clone().expect("clone");
                    let writer = std::thread::spawn(move || {
                        let chunk = vec![0x3cu8; 64 * 1024];
                        let mut left = per;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            w.write_all(&chunk[..n]).expect("write");
                            left -= n;
                        }
                        let _ = w.shutdown(std::net::Shutdown::Write);
                    });
                    let mut n = 0usize;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                    }
                    writer.join().expect("writer");
                    assert_eq!(n, per, "echo came back whole");
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "qemu    echo through a TCG guest, {conns} connection(s): {mib} MiB each way in {secs:.2} s = {:.1} MiB/s each way",
            mib as f64 / secs
        );
    }
    drop(vm);
    handle.stop();
    let _ = handle.join();
}

fn main() {
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("all");
    let mib: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    if mode == "device" || mode == "all" {
        device_bench(mib << 20);
    }
    if mode == "qemu" || mode == "all" {
        qemu_bench((mib / 8).max(8));
    }
}
