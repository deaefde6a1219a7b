//! vsock on kiln's in-process virtio transport ([`crate::transport`]): [`VirtioVsock`]
//! implements [`VirtioDevice`] and, once the driver activates it, runs [`VsockHandler`] on
//! one thread that waits on the RX, TX and event queue kicks and on the host sockets (the
//! muxer's epoll fd). The generic `QueueWorker` only waits on kicks, and vsock must also
//! fill the RX queue when a host socket has data, hence this thread of its own.
//!
//! The handler (and so the bound host socket) outlives activations: a driver reset stops the
//! thread, closes every connection and keeps the handler for the next activation.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{error, warn};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{avail_features, VsockConfig, EVENT_QUEUE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use super::handler::VsockHandler;
use super::Result;
use crate::transport::{
    read_config_bytes, ActivateContext, ActivateError, DeviceQueue, Interrupt, VirtioDevice,
};

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

const STOP_TOKEN: u64 = u64::MAX;
const HOST_TOKEN: u64 = u64::MAX - 1;

/// The vsock device for a kiln VM.
pub struct VirtioVsock {
    config: VsockConfig,
    /// The handler while no worker runs.
    handler: Option<VsockHandler>,
    worker: Option<Worker>,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<VsockHandler>,
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
            let _ = w.stop.write(1);
            match w.thread.join() {
                Ok(h) => self.handler = Some(h),
                Err(_) => error!("vsock worker panicked; the device is gone until restart"),
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
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let setup = || -> std::io::Result<()> {
            epoll.ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                handler.muxer().as_raw_fd(),
                EpollEvent::new(EventSet::IN, HOST_TOKEN),
            )?;
            for q in [Some(&rx), Some(&tx), event.as_ref()].into_iter().flatten() {
                epoll.ctl(
                    ControlOperation::Add,
                    q.kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, u64::from(q.index)),
                )?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            self.handler = Some(handler);
            return Err(e.into());
        }
        let stop2 = stop.try_clone()?;
        let mem = ctx.mem;
        let interrupt = ctx.interrupt;
        let thread = std::thread::Builder::new()
            .name("kiln-vsock".into())
            .spawn(move || run(handler, epoll, stop2, mem, rx, tx, event, interrupt))?;
        self.worker = Some(Worker { stop, thread });
        Ok(())
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

#[allow(clippy::too_many_arguments)]
fn run(
    mut handler: VsockHandler,
    epoll: Epoll,
    stop: EventFd,
    mem: GuestMemoryMmap,
    mut rx: DeviceQueue,
    mut tx: DeviceQueue,
    event: Option<DeviceQueue>,
    interrupt: Arc<Interrupt>,
) -> VsockHandler {
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("vsock worker epoll: {e}");
                return handler;
            }
        };
        let mut notify = false;
        for ev in &events[..n] {
            match ev.data() {
                STOP_TOKEN => {
                    let _ = stop.read();
                    return handler;
                }
                HOST_TOKEN => handler.process_host_events(),
                i if i == TX_QUEUE as u64 => {
                    let _ = tx.kick.read();
                    notify |= handler.process_tx(&mem, &mut tx.queue).unwrap_or(false);
                }
                i if i == RX_QUEUE as u64 => {
                    let _ = rx.kick.read();
                }
                _ => {
                    // The event queue: the device sends no events (no migration), so its
                    // buffers stay with the device; just drain the kick.
                    if let Some(e) = event.as_ref() {
                        let _ = e.kick.read();
                    }
                }
            }
        }
        // Kicks, TX packets and host data can all leave packets for the guest.
        let rx_notify = handler.process_rx(&mem, &mut rx.queue).unwrap_or(false);
        if (notify || rx_notify) && interrupt.signal_used_queue().is_err() {
            warn!("vsock: raising the queue interrupt failed");
        }
    }
}
