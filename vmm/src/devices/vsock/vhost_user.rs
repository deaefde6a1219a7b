//! The vsock device served to QEMU as a vhost-user backend (`vhost-user-vsock-pci`).
//!
//! QEMU keeps the event queue to itself; the backend serves RX (0) and TX (1). Host sockets
//! are polled on the same worker thread as the queues (the muxer's epoll fd is registered
//! with the vring epoll handler), so the packet logic never needs a lock of its own.
//!
//! Lifecycle: a guest reboot makes QEMU stop the rings (GET_VRING_BASE) and, with the
//! RESET_DEVICE protocol feature, reset the device: either way every connection is closed
//! and the queues serve again once the driver re-initialises them. Frontends are served by
//! the shared [`crate::vhost_user`] plumbing, one daemon per QEMU connection; the vsock
//! state (host socket, connections) outlives them, and a guard dropped with each daemon
//! closes that frontend's connections as soon as QEMU is gone.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackend, VhostUserBackendMut, VringEpollHandler, VringRwLock, VringT,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::vhost_user::{serve_with_setup, BackendHandle, GuestMem};

use super::device::{avail_features, VsockConfig, MAX_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use super::handler::VsockHandler;
use super::{Result, VsockError};

/// Queues the vhost-user backend serves: RX and TX.
pub const VHOST_USER_QUEUES: usize = 2;
/// Epoll token of the host socket events (`num_queues` itself is the library's exit event).
const HOST_EVENT: u16 = VHOST_USER_QUEUES as u16 + 1;

/// The vsock device as a vhost-user backend.
pub struct VsockBackend {
    handler: VsockHandler,
    config: VsockConfig,
    mem: GuestMem,
}

impl VsockBackend {
    pub fn new(handler: VsockHandler, config: VsockConfig) -> Self {
        Self {
            handler,
            config,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        }
    }

    pub fn handler(&self) -> &VsockHandler {
        &self.handler
    }

    fn run_tx(&mut self, vring: &VringRwLock) {
        let mem = self.mem.memory();
        let notify = {
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return;
            }
            self.handler.process_tx(&*mem, state.get_queue_mut())
        };
        signal(vring, notify, "tx");
    }

    fn run_rx(&mut self, vring: &VringRwLock) {
        let mem = self.mem.memory();
        let notify = {
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return;
            }
            self.handler.process_rx(&*mem, state.get_queue_mut())
        };
        signal(vring, notify, "rx");
    }
}

fn signal(vring: &VringRwLock, notify: Result<bool>, name: &str) {
    match notify {
        Ok(true) => {
            if let Err(e) = vring.signal_used_queue() {
                warn!(queue = name, error = %e, "vsock: cannot signal the guest");
            }
        }
        Ok(false) => {}
        // Already logged by the handler; the queue waits for a reset.
        Err(_) => {}
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        VHOST_USER_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        avail_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        info!("vsock: device reset by the frontend");
        self.handler.reset();
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The queues carry the flag themselves (the library sets it on each vring).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn update_memory(&mut self, mem: GuestMem) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(error = %e, "vsock: cannot create the worker exit event");
                None
            }
        }
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend stops the device (guest reboot or driver reset). The
        // guest's sockets are gone with it, so the host's must go too.
        debug!(queue_index, "vsock: ring stopped; closing connections");
        self.handler.reset();
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        match device_event {
            e if e as usize == RX_QUEUE => {}
            e if e as usize == TX_QUEUE => self.run_tx(tx),
            HOST_EVENT => self.handler.process_host_events(),
            other => debug!(other, "vsock: unexpected event"),
        }
        // Whatever happened may have produced packets for the guest. Errors are never
        // returned: an error here would end the worker thread for good.
        self.run_rx(rx);
        Ok(())
    }
}

type SharedBackend = Arc<RwLock<VsockBackend>>;

/// Closes every vsock connection when the last clone of a frontend's backend goes, i.e.
/// when the daemon serving that frontend is torn down after QEMU disconnected or exited.
struct FrontendGuard {
    backend: SharedBackend,
}

impl Drop for FrontendGuard {
    fn drop(&mut self) {
        let mut b = self.backend.write().unwrap_or_else(PoisonError::into_inner);
        b.handler.reset();
        // Unmap the departed frontend's memory now rather than at the next connection.
        b.mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    }
}

/// The backend given to one frontend's daemon: the shared device plus a guard that resets
/// it when the daemon is gone. Everything else delegates to the shared device.
#[derive(Clone)]
pub struct FrontendBackend {
    inner: SharedBackend,
    _guard: Arc<FrontendGuard>,
}

impl VhostUserBackend for FrontendBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }
    fn max_queue_size(&self) -> usize {
        self.inner.max_queue_size()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn acked_features(&self, features: u64) {
        self.inner.acked_features(features)
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.inner.protocol_features()
    }
    fn reset_device(&self) {
        self.inner.reset_device()
    }
    fn set_event_idx(&self, enabled: bool) {
        self.inner.set_event_idx(enabled)
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.get_config(offset, size)
    }
    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.inner.update_memory(mem)
    }
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit_event(thread_index)
    }
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.inner.stop_vring(queue_index)
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        self.inner
            .handle_event(device_event, evset, vrings, thread_id)
    }
}

/// A running vsock vhost-user backend.
pub struct VsockHandle {
    server: BackendHandle,
    backend: SharedBackend,
}

impl VsockHandle {
    /// The vhost-user socket QEMU connects to.
    pub fn socket_path(&self) -> &Path {
        self.server.socket_path()
    }

    /// How many frontends (QEMU processes) have connected so far.
    pub fn frontends(&self) -> u64 {
        self.server.connections()
    }

    /// Number of open vsock connections (for tests and status).
    pub fn num_connections(&self) -> usize {
        self.backend
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .handler()
            .muxer()
            .num_connections()
    }

    /// Asks the server to stop: the current frontend connection is closed and no new one is
    /// accepted. Returns at once; [`VsockHandle::join`] waits.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// Waits for the server thread to end (after [`VsockHandle::stop`], or a fatal error).
    pub fn join(self) -> Result<()> {
        self.server
            .join()
            .map_err(|e| VsockError::Daemon(e.to_string()))
    }
}

/// Serves a vsock device for guest `guest_cid` over vhost-user at `socket_path`, with its
/// host side on `uds_path` (Firecracker convention: `CONNECT <port>\n` on `uds_path`,
/// listeners at `<uds_path>_<port>` for guest-initiated connections). Both sockets are bound
/// before this returns, so QEMU and host programs may connect right away. Frontends are
/// served one after another until [`VsockHandle::stop`]: when QEMU exits, its connections
/// are closed and the next QEMU on the same socket gets a fresh device.
pub fn spawn(socket_path: &Path, uds_path: &Path, guest_cid: u64) -> Result<VsockHandle> {
    let config = VsockConfig::new(guest_cid)?;
    let handler = VsockHandler::new(config, uds_path)?;
    let backend: SharedBackend = Arc::new(RwLock::new(VsockBackend::new(handler, config)));
    let host_fd = backend
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .handler()
        .muxer()
        .as_raw_fd();
    let make = {
        let backend = backend.clone();
        move || FrontendBackend {
            inner: backend.clone(),
            _guard: Arc::new(FrontendGuard {
                backend: backend.clone(),
            }),
        }
    };
    // The host sockets are polled by the vring worker thread, next to the queues.
    let setup = move |_: &FrontendBackend, handlers: &[Arc<VringEpollHandler<FrontendBackend>>]| {
        for h in handlers {
            h.register_listener(host_fd, EventSet::IN, u64::from(HOST_EVENT))?;
        }
        Ok(())
    };
    let server = serve_with_setup("vsock", socket_path, make, setup)
        .map_err(|e| VsockError::Daemon(e.to_string()))?;
    info!(
        socket = %socket_path.display(),
        uds = %uds_path.display(),
        guest_cid,
        "vsock vhost-user backend listening"
    );
    Ok(VsockHandle { server, backend })
}
