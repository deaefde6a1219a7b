//! The vsock queue logic: TX chains become packets for the connection manager, RX chains are
//! filled with the packets it has for the guest. Transport-agnostic: a kiln VM and the
//! vhost-user backend both hand it a guest memory and a `virtio_queue::Queue`.
//!
//! Guest chains are untrusted. A chain that does not parse as a vsock packet (addresses
//! outside guest memory, wrong write flags, too short, absurd lengths) is returned to the
//! guest with length 0 and a logged reason; descriptor loops and over-long chains are cut by
//! virtio-queue's chain iterator. An available ring claiming more entries than the queue
//! holds marks the queue broken until the driver resets the device.

use std::convert::Infallible;
use std::path::Path;

use tracing::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::GuestMemory;

use super::device::VsockConfig;
use super::muxer::{Muxer, RxFill};
use super::protocol::{Header, HEADER_SIZE, MAX_PKT_DATA};
use super::{Result, VsockError};
use crate::devices::in_order::{drain_with, DrainError, Served, Suppress, Work};

/// The vsock device's packet handler.
pub struct VsockHandler {
    muxer: Muxer,
    rx_broken: bool,
    tx_broken: bool,
}

impl VsockHandler {
    /// A handler for a guest with `config`, whose host side listens at `uds_path`.
    pub fn new(config: VsockConfig, uds_path: &Path) -> Result<Self> {
        Ok(Self {
            muxer: Muxer::new(config, uds_path)?,
            rx_broken: false,
            tx_broken: false,
        })
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    pub fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Device reset (driver reset, reboot, vhost-user ring stop): every connection is closed
    /// and the queues are usable again.
    pub fn reset(&mut self) {
        self.muxer.reset();
        self.rx_broken = false;
        self.tx_broken = false;
    }

    /// Whether a queue was found broken (it stays unused until [`VsockHandler::reset`]).
    pub fn is_broken(&self) -> bool {
        self.rx_broken || self.tx_broken
    }

    /// Handles host socket activity. Call when the muxer's fd ([`Muxer`] is `AsRawFd`) is
    /// readable, then [`VsockHandler::process_rx`].
    pub fn process_host_events(&mut self) {
        self.muxer.process_host_events();
    }

    /// Consumes every packet on the TX queue. Returns whether the guest needs an interrupt.
    pub fn process_tx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> Result<bool> {
        if self.tx_broken || !queue.ready() {
            return Ok(false);
        }
        let mut tx = Tx {
            muxer: &mut self.muxer,
            mem,
        };
        let res = drain_with(queue, mem, Suppress::Always, &mut tx, None);
        self.finish(res, "tx")
    }

    /// Fills RX buffers with whatever the host side has for the guest. Returns whether the
    /// guest needs an interrupt.
    pub fn process_rx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> Result<bool> {
        if self.rx_broken || !queue.ready() {
            return Ok(false);
        }
        let mut rx = Rx {
            muxer: &mut self.muxer,
            mem,
        };
        let res = drain_with(queue, mem, Suppress::Always, &mut rx, None);
        self.finish(res, "rx")
    }

    /// A broken queue stays unused until [`VsockHandler::reset`].
    fn finish(
        &mut self,
        res: std::result::Result<bool, DrainError>,
        name: &'static str,
    ) -> Result<bool> {
        res.map_err(|source| {
            error!(queue = name, %source, "vsock: queue broken; waiting for a device reset");
            if name == "rx" {
                self.rx_broken = true;
            } else {
                self.tx_broken = true;
            }
            VsockError::QueueBroken {
                queue: name,
                source,
            }
        })
    }
}

/// The TX queue as drain work: every chain the guest sent is a packet for the muxer.
struct Tx<'a, M> {
    muxer: &'a mut Muxer,
    mem: &'a M,
}

impl<M: GuestMemory> Work<M> for Tx<'_, M> {
    type Error = Infallible;

    fn serve(&mut self, mut chain: DescriptorChain<&M>) -> Served {
        let head = chain.head_index();
        match VsockPacket::from_tx_virtq_chain(self.mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                let hdr = header_of(&pkt);
                self.muxer.handle_tx_packet(&hdr, pkt.data_slice());
            }
            Err(e) => warn!(head, error = %e, "vsock: dropping malformed TX chain"),
        }
        Served::Used(0)
    }
}

/// The RX queue as drain work: a guest buffer is taken only while the muxer has a packet
/// for it.
struct Rx<'a, M> {
    muxer: &'a mut Muxer,
    mem: &'a M,
}

impl<M: GuestMemory> Work<M> for Rx<'_, M> {
    type Error = Infallible;

    fn has_work(&mut self) -> std::result::Result<bool, Infallible> {
        Ok(self.muxer.has_rx_work())
    }

    fn serve(&mut self, mut chain: DescriptorChain<&M>) -> Served {
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(self.mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => {
                let mut hdr = [0u8; HEADER_SIZE];
                match self.muxer.fill_rx(&mut hdr, pkt.data_slice()) {
                    RxFill::Packet(n) => match pkt.set_header_from_raw(&hdr) {
                        Ok(()) => n,
                        Err(e) => {
                            warn!(head, error = %e, "vsock: cannot write RX header");
                            0
                        }
                    },
                    // Give the buffer back for the next packet.
                    RxFill::Nothing => return Served::Later,
                    RxFill::NoRoom => {
                        warn!(head, "vsock: RX buffer without a payload area");
                        0
                    }
                }
            }
            Err(e) => {
                warn!(head, error = %e, "vsock: dropping malformed RX chain");
                0
            }
        };
        Served::Used(len)
    }
}

fn header_of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    }
}
