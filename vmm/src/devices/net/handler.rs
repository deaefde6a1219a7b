//! The virtio-net frame logic: guest tx chains become frames on the port; frames from the
//! port fill guest rx chains. Transport-independent (a `virtio_queue::Queue` and a
//! `GuestMemory`), so the in-process transport and the vhost-user backend share it.
//!
//! Frames keep their order both ways, and none is lost inside the device: a frame is taken
//! from the port only once there is a guest buffer for it; when the rx ring is full it waits
//! in `pending` (one frame) and the rest stay queued in the port.

use std::io::Read;
use std::sync::Arc;

use kiln_net::{FramePort, PortError, MAX_FRAME};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemory;

use crate::devices::in_order::{drain, drain_with, DrainError, Served, Suppress, Work};

use super::device::{header_len, MAX_TX_FRAME};

/// Why a queue could not be processed at all: the transport logs it and leaves that queue
/// alone until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum NetQueueError {
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("frame port: {0}")]
    Port(PortError),
}

impl From<DrainError> for NetQueueError {
    fn from(e: DrainError) -> NetQueueError {
        match e {
            DrainError::Queue(e) => NetQueueError::Queue(e),
        }
    }
}

impl From<DrainError<PortError>> for NetQueueError {
    fn from(e: DrainError<PortError>) -> NetQueueError {
        match e {
            DrainError::Queue(e) => NetQueueError::Queue(e),
            DrainError::Work(e) => NetQueueError::Port(e),
        }
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Guest tx chains refused (unreadable, shorter than the header, larger than a frame).
    pub tx_malformed: u64,
    /// Frames dropped because the guest's rx buffer could not hold them.
    pub rx_too_small: u64,
}

/// The frame logic of one virtio-net device (one queue pair).
pub struct NetHandler {
    port: Arc<dyn FramePort>,
    acked: u64,
    hdr_len: usize,
    /// Length of a frame taken from the port into `rx_buf` that no guest buffer has taken yet.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl NetHandler {
    pub fn new(port: Arc<dyn FramePort>) -> Self {
        NetHandler {
            port,
            acked: 0,
            hdr_len: header_len(0),
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_TX_FRAME],
            stats: NetStats::default(),
        }
    }

    pub fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
        self.hdr_len = header_len(features);
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The port whose rx fd the transport waits on.
    pub fn port(&self) -> &Arc<dyn FramePort> {
        &self.port
    }

    /// Device reset: a frame held for the old rings is dropped (the guest reboots).
    pub fn reset(&mut self) {
        self.pending = None;
    }

    /// Send every frame the guest made available on the tx queue. Returns whether the driver
    /// must be notified.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, NetQueueError> {
        Ok(drain(queue, mem, |chain| {
            self.tx_chain(chain, mem);
            0
        })?)
    }

    fn tx_chain<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, mem: &M) {
        let head = chain.head_index();
        let mut reader = match chain.reader(mem) {
            Ok(r) => r,
            Err(e) => {
                warn!(head, "virtio-net: refused tx chain: {e}");
                self.stats.tx_malformed += 1;
                return;
            }
        };
        let total = reader.available_bytes();
        if total < self.hdr_len || total - self.hdr_len > MAX_TX_FRAME || total == self.hdr_len {
            warn!(
                head,
                total, "virtio-net: refused tx chain: {total} bytes is not a header and one frame"
            );
            self.stats.tx_malformed += 1;
            return;
        }
        let len = total - self.hdr_len;
        let mut hdr = [0u8; 12];
        let hl = self.hdr_len;
        if let Err(e) = reader
            .read_exact(&mut hdr[..hl])
            .and_then(|_| reader.read_exact(&mut self.tx_buf[..len]))
        {
            warn!(head, "virtio-net: cannot read tx chain: {e}");
            self.stats.tx_malformed += 1;
            return;
        }
        match self.port.send(&self.tx_buf[..len]) {
            Ok(()) => self.stats.tx_frames += 1,
            // A down link drops frames, as a cable pulled out would.
            Err(e) => debug!("virtio-net: tx frame dropped: {e}"),
        }
    }

    /// Fill guest rx buffers with frames waiting in the port. Returns whether the driver
    /// must be notified.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, NetQueueError> {
        let mut rx = Rx { handler: self, mem };
        Ok(drain_with(
            queue,
            mem,
            Suppress::WithEventIdx,
            &mut rx,
            None,
        )?)
    }

    /// Take the next frame from the port into `rx_buf`, unless one is already waiting there.
    /// Returns whether a frame waits.
    fn next_frame(&mut self) -> Result<bool, PortError> {
        while self.pending.is_none() {
            match self.port.recv(&mut self.rx_buf) {
                Ok(Some(n)) => self.pending = Some(n),
                Ok(None) | Err(PortError::Closed) => return Ok(false),
                Err(PortError::TooLarge(n)) => {
                    debug!("virtio-net: dropped a {n}-byte frame from the port");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn rx_chain<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, mem: &M, len: usize) -> u32 {
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                warn!(head, "virtio-net: refused rx chain: {e}");
                return 0;
            }
        };
        let need = self.hdr_len + len;
        if writer.available_bytes() < need {
            warn!(
                head,
                "virtio-net: rx buffer of {} bytes cannot hold a {len}-byte frame; dropped",
                writer.available_bytes()
            );
            self.stats.rx_too_small += 1;
            return 0;
        }
        // virtio_net_hdr_v1: no checksum or GSO work, one buffer.
        let mut hdr = [0u8; 12];
        hdr[10] = 1;
        let hl = self.hdr_len;
        use std::io::Write;
        if let Err(e) = writer
            .write_all(&hdr[..hl])
            .and_then(|_| writer.write_all(&self.rx_buf[..len]))
        {
            warn!(head, "virtio-net: cannot write rx chain: {e}");
            return 0;
        }
        self.stats.rx_frames += 1;
        need as u32
    }
}

/// The rx queue as drain work: a guest buffer is taken only when a frame waits for it, so
/// a frame is never lost for want of a buffer (it waits in `pending`, the rest in the port).
struct Rx<'a, M> {
    handler: &'a mut NetHandler,
    mem: &'a M,
}

impl<M: GuestMemory> Work<M> for Rx<'_, M> {
    type Error = PortError;

    fn has_work(&mut self) -> Result<bool, PortError> {
        self.handler.next_frame()
    }

    fn serve(&mut self, chain: DescriptorChain<&M>) -> Served {
        let len = self.handler.pending.take().unwrap_or(0);
        Served::Used(self.handler.rx_chain(chain, self.mem, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::device::NetDeviceConfig;
    use kiln_net::port_pair;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn handler() -> (NetHandler, kiln_net::QueuePort) {
        let (dev, net) = port_pair(64).unwrap();
        let mut h = NetHandler::new(Arc::new(dev));
        h.set_acked_features(NetDeviceConfig::new([2, 0, 0, 0, 0, 1]).features());
        (h, net)
    }

    fn used_len(q: &MockSplitQueue<GuestMemoryMmap<()>>, m: &GuestMemoryMmap<()>, i: u64) -> u32 {
        m.read_obj(q.used_addr().unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }
    fn used_idx(q: &MockSplitQueue<GuestMemoryMmap<()>>, m: &GuestMemoryMmap<()>) -> u16 {
        m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
    }

    use vm_memory::Address;

    #[test]
    fn tx_sends_frames_in_order_across_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Chain 1: header alone, then the frame split over two descriptors.
        m.write_slice(&[0u8; 12], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&[0xaa; 20], GuestAddress(0x11_0000)).unwrap();
        m.write_slice(&[0xbb; 40], GuestAddress(0x12_0000)).unwrap();
        // Chain 2: header and frame in one descriptor.
        let mut one = vec![0u8; 12];
        one.extend_from_slice(&[0xcc; 60]);
        m.write_slice(&one, GuestAddress(0x13_0000)).unwrap();
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 12, 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x11_0000, 20, 1, 2)),
                desc(0x12_0000, 40, 0),
                desc(0x13_0000, 72, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, net) = handler();
        assert!(h.process_tx(&mut q, &m).unwrap());
        let mut buf = [0u8; 2048];
        let n = net.recv(&mut buf).unwrap().unwrap();
        assert_eq!(n, 60);
        assert_eq!(&buf[..20], &[0xaa; 20]);
        assert_eq!(&buf[20..60], &[0xbb; 40]);
        let n = net.recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], &[0xcc; 60]);
        assert_eq!(used_idx(&vq, &m), 2);
        assert_eq!(h.stats().tx_frames, 2);
    }

    #[test]
    fn tx_refuses_malformed_chains_and_goes_on() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 5, 0),         // shorter than the header
                desc(0x10_1000, 12 + 9000, 0), // larger than a frame
                desc(0xffff_0000, 100, 0),     // outside guest memory
                desc(0x10_3000, 12 + 64, 0),   // fine
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, net) = handler();
        h.process_tx(&mut q, &m).unwrap();
        assert_eq!(h.stats().tx_malformed, 3);
        assert_eq!(h.stats().tx_frames, 1);
        let mut buf = [0u8; 2048];
        assert_eq!(net.recv(&mut buf).unwrap(), Some(64));
        assert_eq!(net.recv(&mut buf).unwrap(), None);
        assert_eq!(used_idx(&vq, &m), 4, "every chain is returned");
    }

    #[test]
    fn tx_refuses_a_lying_avail_index() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 76, 0)], 0).unwrap();
        m.write_obj(500u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, _net) = handler();
        assert!(h.process_tx(&mut q, &m).is_err());
    }

    #[test]
    fn rx_fills_buffers_with_header_and_keeps_order() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 2048, F_WRITE),
                desc(0x11_0000, 2048, F_WRITE),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, net) = handler();
        net.send(&[1; 100]).unwrap();
        net.send(&[2; 200]).unwrap();
        net.send(&[3; 300]).unwrap();
        assert!(h.process_rx(&mut q, &m).unwrap());
        assert_eq!(used_idx(&vq, &m), 2);
        assert_eq!(used_len(&vq, &m, 0), 112);
        assert_eq!(used_len(&vq, &m, 1), 212);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hdr[10], 1, "num_buffers");
        let mut f = [0u8; 200];
        m.read_slice(&mut f, GuestAddress(0x11_000c)).unwrap();
        assert_eq!(f, [2; 200]);
        // The third frame waits for a buffer: nothing lost, nothing reordered.
        vq.add_desc_chains(&[desc(0x12_0000, 2048, F_WRITE)], 2)
            .unwrap();
        net.send(&[4; 50]).unwrap();
        h.process_rx(&mut q, &m).unwrap();
        assert_eq!(used_idx(&vq, &m), 3);
        let mut f = [0u8; 300];
        m.read_slice(&mut f, GuestAddress(0x12_000c)).unwrap();
        assert_eq!(f, [3; 300]);
    }

    #[test]
    fn rx_drops_a_frame_a_small_or_bad_buffer_cannot_hold() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 50, F_WRITE),     // too small
                desc(0xffff_0000, 2048, F_WRITE), // outside memory
                desc(0x10_2000, 2048, 0),         // read-only: no room to write
                desc(0x10_3000, 2048, F_WRITE),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, net) = handler();
        for i in 0..4u8 {
            net.send(&[i; 100]).unwrap();
        }
        h.process_rx(&mut q, &m).unwrap();
        assert_eq!(used_idx(&vq, &m), 4);
        assert_eq!(used_len(&vq, &m, 0), 0);
        assert_eq!(used_len(&vq, &m, 1), 0);
        assert_eq!(used_len(&vq, &m, 2), 0);
        assert_eq!(used_len(&vq, &m, 3), 112);
        let mut f = [0u8; 100];
        m.read_slice(&mut f, GuestAddress(0x10_300c)).unwrap();
        assert_eq!(f, [3; 100]);
    }

    #[test]
    fn reset_drops_the_held_frame() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut h, net) = handler();
        net.send(&[9; 10]).unwrap();
        net.send(&[8; 10]).unwrap();
        h.process_rx(&mut q, &m).unwrap();
        h.reset();
        vq.add_desc_chains(&[desc(0x10_0000, 2048, F_WRITE)], 0)
            .unwrap();
        h.process_rx(&mut q, &m).unwrap();
        let mut f = [0u8; 10];
        m.read_slice(&mut f, GuestAddress(0x10_000c)).unwrap();
        assert_eq!(f, [8; 10]);
    }

    #[test]
    fn rx_under_load_loses_and_reorders_nothing() {
        // 200 numbered frames arrive faster than the guest posts buffers (20 at a time);
        // every one must come out, in order, as buffers appear.
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let mut q: Queue = vq.create_queue().unwrap();
        let (dev, net) = port_pair(256).unwrap();
        let mut h = NetHandler::new(Arc::new(dev));
        h.set_acked_features(NetDeviceConfig::new([2, 0, 0, 0, 0, 1]).features());
        let mut sent = 0u16;
        let mut seen = 0u16;
        for round in 0..10u16 {
            for _ in 0..25 {
                if sent < 200 {
                    let mut f = vec![0u8; 60 + usize::from(sent % 7)];
                    f[..2].copy_from_slice(&sent.to_be_bytes());
                    net.send(&f).unwrap();
                    sent += 1;
                }
            }
            h.process_rx(&mut q, &m).unwrap();
            let chains: Vec<RawDescriptor> = (0..20u64)
                .map(|i| {
                    desc(
                        0x10_0000 + (u64::from(round) * 20 + i) * 0x1000,
                        2048,
                        F_WRITE,
                    )
                })
                .collect();
            vq.add_desc_chains(&chains, round * 20).unwrap();
            h.process_rx(&mut q, &m).unwrap();
            while seen < used_idx(&vq, &m) {
                let mut n = [0u8; 2];
                let at = 0x10_0000 + u64::from(seen) * 0x1000 + 12;
                m.read_slice(&mut n, GuestAddress(at)).unwrap();
                assert_eq!(u16::from_be_bytes(n), seen, "frame order");
                assert_eq!(
                    used_len(&vq, &m, u64::from(seen)),
                    12 + 60 + u32::from(seen % 7)
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 200, "every frame delivered");
        assert_eq!(h.stats().rx_frames, 200);
    }
}
