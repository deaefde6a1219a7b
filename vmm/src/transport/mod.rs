//! The virtio transport devices plug into: virtio-mmio version 2 (virtio 1.x, "modern"),
//! with queue notifications on ioeventfds and interrupts on irqfds, so neither a kick nor an
//! interrupt passes through a vCPU thread.
//!
//! A device implements [`VirtioDevice`]: its type, features, queue sizes, config space, and
//! [`VirtioDevice::activate`], which hands it the guest memory, its queues (each a
//! `virtio_queue::Queue` and the eventfd the guest's notifications arrive on) and an
//! [`Interrupt`]. The device's request logic, written as a [`QueueHandler`], runs on a
//! thread started by [`QueueWorker::spawn`], which waits on the kick eventfds and on any
//! file descriptors of the device's own ([`ExtraFd`]), and raises the interrupt when the
//! handler says the guest should be told.
//!
//! The devices on this transport live with the rest of each device, in its `in_process.rs`:
//! `devices::block::VirtioBlock` (a `QueueWorker` per queue), `devices::net::VirtioNet` (one
//! worker that also waits on the frame port) and `devices::vsock::VirtioVsock` (one worker
//! that also waits on the host sockets). `tests/it/kvm_blk.rs`, `kvm_net.rs` and
//! `kvm_vsock.rs` drive all three from a tiny guest driver in a kiln VM.

pub mod mmio;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
pub use worker::{ExtraFd, QueueHandler, QueueWorker, SpawnError};

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status bits the driver reads and acknowledges, and the irqfd
/// that raises the line.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tell the driver a used ring changed.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(INT_VRING)
    }

    /// Tell the driver the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        // The status must be visible before the interrupt: the driver's handler reads it
        // and ignores an interrupt whose status is empty.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd (for registering with KVM).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// One queue handed to a device at activation.
pub struct DeviceQueue {
    /// Queue index within the device.
    pub index: u16,
    pub queue: Queue,
    /// Becomes readable when the driver notifies this queue.
    pub kick: EventFd,
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// Features the driver accepted (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<DeviceQueue>,
    pub interrupt: std::sync::Arc<Interrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device cannot run with these queues: {0}")]
    BadQueues(String),
    #[error("starting the device: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block, 19 vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered feature bits. VIRTIO_F_VERSION_1 is added by the transport.
    fn features(&self) -> u64;
    /// Read the device config space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device config space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop serving and forget the queues (the driver reset the device).
    fn reset(&mut self);
}

/// Copy `config` bytes from `offset` into `data`, zero-filling past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(off) = usize::try_from(offset) {
        if off < config.len() {
            let n = data.len().min(config.len() - off);
            data[..n].copy_from_slice(&config[off..off + n]);
        }
    }
}
