//! Fuzz harness: arbitrary bytes drive a guest that writes descriptor chains (well-formed
//! packets, raw descriptors with arbitrary addresses, lengths, flags and `next` links, bogus
//! ring indexes) into the vsock device's TX and RX queues, while a host program talks on the
//! Unix sockets. The device must never panic, hang or touch memory outside the guest's.
//!
//! Used by `vmm/fuzz/fuzz_targets/vsock_queue.rs` and, over seeded pseudo-random inputs, by a
//! unit test so CI exercises it on stable.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::VsockConfig;
use super::handler::VsockHandler;
use super::muxer::unix::guest_port_path;
use super::protocol::*;

const GUEST_CID: u64 = 3;
/// A host listener exists for this port, so guest REQUESTs to it establish connections.
const LISTEN_PORT: u32 = 1234;
const QSIZE: u16 = 16;
const TX_BASE: u64 = 0x0;
const RX_BASE: u64 = 0x800;
const BUF_BASE: u64 = 0x1000;
/// Guest memory: two regions with a hole between them, so chains can straddle or miss.
const REGION0: (u64, usize) = (0, 0x9000);
const REGION1: (u64, usize) = (0xa000, 0x6000);
const BUF_SPAN: u64 = 0x7000;

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | (u32::from(self.u16()?) << 16))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from(self.u32()?) | (u64::from(self.u32()?) << 32))
    }
}

/// Layout of one split queue in the fuzz guest's memory.
struct RingLayout {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
}

impl RingLayout {
    fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 16 * u64::from(QSIZE),
            used: base + 0x400,
            next_desc: 0,
        }
    }

    fn queue(&self) -> Option<Queue> {
        let mut q = Queue::new(QSIZE).ok()?;
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_event_idx(false);
        q.set_ready(true);
        Some(q)
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(i % QSIZE));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, at);
    }

    /// Publishes a chain head in the available ring.
    fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap_or(0);
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(idx % QSIZE));
        let _ = mem.write_obj(head, slot);
        let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2));
    }

    fn alloc(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (self.next_desc + n) % QSIZE;
        first
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Feeds `data` to a fresh vsock device. Never panics on any input (that is the property).
pub fn fuzz_entry(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!(
        "kiln-vsock-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    run(&dir, data);
    let _ = std::fs::remove_dir_all(&dir);
}

fn run(dir: &std::path::Path, data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ]) else {
        return;
    };
    let uds: PathBuf = dir.join("v.sock");
    let Ok(config) = VsockConfig::new(GUEST_CID) else {
        return;
    };
    let Ok(mut dev) = VsockHandler::new(config, &uds) else {
        return;
    };
    let Ok(port_listener) = UnixListener::bind(guest_port_path(&uds, LISTEN_PORT)) else {
        return;
    };
    let _ = port_listener.set_nonblocking(true);
    let mut host_streams: Vec<UnixStream> = Vec::new();

    let mut tx = RingLayout::new(TX_BASE);
    let mut rx = RingLayout::new(RX_BASE);
    let (Some(mut txq), Some(mut rxq)) = (tx.queue(), rx.queue()) else {
        return;
    };
    let mut inp = Input { data };
    let mut buf_cursor = 0u64;
    let mut next_buf = |len: u64| -> u64 {
        let at = BUF_BASE + (buf_cursor % BUF_SPAN);
        buf_cursor = buf_cursor.wrapping_add(len.max(1));
        at
    };

    // Bounded so every input finishes quickly.
    for _ in 0..256 {
        let Some(cmd) = inp.byte() else { break };
        match cmd % 8 {
            0 => {
                // A well-formed packet (mostly), with the header fields chosen by the input.
                let (Some(op), Some(port_sel), Some(len), Some(flags), Some(misc)) =
                    (inp.byte(), inp.byte(), inp.u16(), inp.byte(), inp.byte())
                else {
                    break;
                };
                let len = u32::from(len) % 0x1200;
                let hdr = Header {
                    src_cid: if misc & 0x80 != 0 {
                        u64::from(misc)
                    } else {
                        GUEST_CID
                    },
                    dst_cid: if misc & 0x40 != 0 { 7 } else { HOST_CID },
                    src_port: 50 + u32::from(port_sel & 3),
                    dst_port: if port_sel & 4 != 0 { 999 } else { LISTEN_PORT },
                    len,
                    type_: if misc & 0x20 != 0 { 2 } else { TYPE_STREAM },
                    op: u16::from(op % 9),
                    flags: u32::from(flags & 3),
                    buf_alloc: if misc & 0x10 != 0 { 0 } else { 64 * 1024 },
                    fwd_cnt: u32::from(misc & 0x0f),
                };
                let hdr_at = next_buf(HEADER_SIZE as u64 + u64::from(len));
                let _ = mem.write_slice(&hdr.to_bytes(), GuestAddress(hdr_at));
                let head = tx.alloc(2);
                if misc & 1 != 0 {
                    // Header and data in one descriptor (Linux 6.2+ layout).
                    tx.write_desc(&mem, head, hdr_at, HEADER_SIZE as u32 + len, 0, 0);
                } else {
                    let data_at = next_buf(u64::from(len));
                    let next = (head + 1) % QSIZE;
                    tx.write_desc(&mem, head, hdr_at, HEADER_SIZE as u32, 1, next);
                    tx.write_desc(&mem, next, data_at, len, 0, 0);
                }
                tx.publish(&mem, head);
            }
            1 | 2 => {
                // Raw descriptors: any address, length, flags and link.
                let ring = if cmd % 8 == 1 { &mut tx } else { &mut rx };
                let Some(n) = inp.byte() else { break };
                let n = u16::from(n % 4) + 1;
                let head = ring.alloc(n);
                for i in 0..n {
                    let (Some(addr), Some(len), Some(fl), Some(next)) =
                        (inp.u64(), inp.u32(), inp.u16(), inp.u16())
                    else {
                        break;
                    };
                    // Half the time keep the address near guest memory so deeper code runs.
                    let addr = if fl & 0x8000 != 0 {
                        addr
                    } else {
                        addr % 0x11000
                    };
                    let len = if fl & 0x4000 != 0 { len } else { len % 0x2000 };
                    ring.write_desc(&mem, (head + i) % QSIZE, addr, len, fl & 0x7, next);
                }
                ring.publish(&mem, head);
            }
            3 => {
                let _ = dev.process_tx(&mem, &mut txq);
            }
            4 => {
                // Well-formed RX buffers, then let the device fill them.
                let Some(n) = inp.byte() else { break };
                for _ in 0..(n % 4) + 1 {
                    let head = rx.alloc(2);
                    let next = (head + 1) % QSIZE;
                    let h = next_buf(HEADER_SIZE as u64);
                    let d = next_buf(0x800);
                    rx.write_desc(&mem, head, h, HEADER_SIZE as u32, 1 | 2, next);
                    rx.write_desc(&mem, next, d, 0x800, 2, 0);
                    rx.publish(&mem, head);
                }
                let _ = dev.process_rx(&mem, &mut rxq);
            }
            5 => {
                // Corrupt a ring index.
                let (Some(which), Some(v)) = (inp.byte(), inp.u16()) else {
                    break;
                };
                let ring = if which & 1 == 0 { &tx } else { &rx };
                let _ = mem.write_obj(v, GuestAddress(ring.avail + 2));
            }
            6 => {
                // Host side: accept guest connections, write data, close some.
                while let Ok((s, _)) = port_listener.accept() {
                    let _ = s.set_nonblocking(true);
                    host_streams.push(s);
                }
                let Some(sel) = inp.byte() else { break };
                if let Some(s) = host_streams.get_mut(usize::from(sel) % 4) {
                    if sel & 0x80 != 0 {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    } else {
                        let _ = s.write(&[sel; 300]);
                        let mut sink = [0u8; 4096];
                        let _ = s.read(&mut sink);
                    }
                }
                dev.process_host_events();
                let _ = dev.process_rx(&mem, &mut rxq);
            }
            _ => {
                // A host program connecting with some handshake line.
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    let Some(sel) = inp.byte() else { break };
                    let line = match sel % 4 {
                        0 => format!("CONNECT {LISTEN_PORT}\n"),
                        1 => format!("CONNECT {}\n", u32::from(sel) * 1000),
                        2 => "CONNECT x\n".to_string(),
                        _ => "C".repeat(usize::from(sel)),
                    };
                    let _ = s.write_all(line.as_bytes());
                    let _ = s.set_nonblocking(true);
                    host_streams.push(s);
                }
                dev.process_host_events();
                let _ = dev.process_rx(&mem, &mut rxq);
            }
        }
    }
    let _ = dev.process_tx(&mem, &mut txq);
    dev.process_host_events();
    let _ = dev.process_rx(&mem, &mut rxq);
    dev.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a dependency-free PRNG, enough to spread inputs.
    fn next(state: &mut u64) -> u64 {
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn fuzz_entry_survives_seeded_inputs() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..300 {
            let len = (next(&mut state) % 600) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
            // Bias a third of the inputs towards well-formed traffic so the deeper states
            // (established connections, data, shutdown) are reached too.
            if i % 3 == 0 {
                for (j, b) in input.iter_mut().enumerate() {
                    if j % 7 == 0 {
                        *b = [0u8, 3, 4, 6, 0, 3][(j / 7) % 6];
                    }
                }
            }
            fuzz_entry(&input);
        }
    }
}
