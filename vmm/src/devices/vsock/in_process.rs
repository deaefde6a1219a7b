//! vsock on kiln's own transport ([`crate::transport`], the `kvm` engine): [`VirtioVsock`]
//! implements [`VirtioDevice`] and, once the driver activates it, runs [`VsockHandler`] on a
//! [`QueueWorker`] that waits on the RX, TX and event queue kicks and on the host sockets
//! (the muxer's epoll fd).
//!
//! The handler (and so the bound host socket) outlives activations: a driver reset stops the
//! worker, closes every connection and keeps the handler for the next activation.

use std::os::fd::AsRawFd;
use std::path::Path;

use tracing::error;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::device::{
    avail_features, VsockConfig, EVENT_QUEUE, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VIRTIO_ID_VSOCK,
};
use super::handler::VsockHandler;
use super::Result;
use crate::transport::{
    read_config_bytes, ActivateContext, ActivateError, DeviceQueue, ExtraFd, QueueHandler,
    QueueWorker, SpawnError, VirtioDevice,
};

/// The [`ExtraFd`] id of the host sockets (the muxer's epoll fd).
const HOST: u64 = 0;

/// The vsock device for a kiln VM.
pub struct VirtioVsock {
    config: VsockConfig,
    /// The handler while no worker runs.
    handler: Option<VsockHandler>,
    worker: Option<QueueWorker>,
}

impl VirtioVsock {
    /// A device for guest `guest_cid` whose host side listens at `uds_path` (bound now).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self> {
        let config = VsockConfig::new(guest_cid)?;
        let handler = VsockHandler::new(config, uds_path)?;
        Ok(Self {
            config,
            handler: Some(handler),
            worker: None,
        })
    }

    /// Stops the worker, if any, and takes the handler back.
    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            match w.stop::<VsockQueues>() {
                Some(q) => self.handler = Some(q.0),
                None => error!("vsock worker panicked; the device is gone until restart"),
            }
        }
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        avail_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), ActivateError> {
        self.stop_worker();
        let Some(mut handler) = self.handler.take() else {
            return Err(ActivateError::Other("vsock handler lost".into()));
        };
        let mut rx = None;
        let mut tx = None;
        let mut event = None;
        for q in ctx.queues {
            match usize::from(q.index) {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                EVENT_QUEUE => event = Some(q),
                _ => {}
            }
        }
        let (Some(mut rx), Some(mut tx)) = (rx, tx) else {
            self.handler = Some(handler);
            return Err(ActivateError::BadQueues(
                "vsock needs its RX and TX queues".into(),
            ));
        };
        // With EVENT_IDX the queues must use the event-index rules to decide on interrupts.
        let event_idx = ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.queue.set_event_idx(event_idx);
        tx.queue.set_event_idx(event_idx);
        handler.reset();
        // In index order, so a queue's index is its position in the worker's queues.
        let queues = [Some(rx), Some(tx), event].into_iter().flatten().collect();
        match QueueWorker::spawn(
            "kiln-vsock",
            VsockQueues(handler),
            ctx.mem,
            queues,
            ctx.interrupt,
        ) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(SpawnError { source, handler }) => {
                self.handler = handler.map(|q| q.0);
                Err(source.into())
            }
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
        if let Some(h) = self.handler.as_mut() {
            h.reset();
        }
    }
}

impl Drop for VirtioVsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// [`VsockHandler`] as the worker runs it: TX is served on its kick, host socket activity
/// is taken in as it comes, and RX is filled once per wake-up, since kicks, TX packets and
/// host data can all leave packets for the guest.
struct VsockQueues(VsockHandler);

impl QueueHandler for VsockQueues {
    fn extra_fds(&self) -> Vec<ExtraFd> {
        vec![ExtraFd {
            fd: self.0.muxer().as_raw_fd(),
            events: EventSet::IN,
            id: HOST,
        }]
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        // An RX kick (new buffers) is served in `events_done`; the event queue's buffers
        // stay with the device, which sends no events (no migration).
        usize::from(index) == TX_QUEUE && self.0.process_tx(mem, queue).unwrap_or(false)
    }

    fn handle_event(&mut self, _id: u64, _mem: &GuestMemoryMmap) -> bool {
        self.0.process_host_events();
        false
    }

    fn events_done(&mut self, queues: &mut [DeviceQueue], mem: &GuestMemoryMmap) -> bool {
        let rx = &mut queues[RX_QUEUE].queue;
        self.0.process_rx(mem, rx).unwrap_or(false)
    }
}
