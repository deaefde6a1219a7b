//! virtio-net served to QEMU as a vhost-user-net backend, on the same frame logic as the
//! in-process device ([`super::handler`]).
//!
//! ```text
//! -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem
//! -chardev socket,id=n0,path=<socket>
//! -netdev vhost-user,id=n0,chardev=n0 -device virtio-net-pci,netdev=n0,mac=<mac>,vectors=0
//! ```
//!
//! `vectors=0` (INTx instead of MSI-X): QEMU 7.2 crashes in `msix_set_vector_notifiers` when
//! a vhost-user netdev starts with MSI-X vectors. QEMU connects to the socket given to
//! [`spawn`]; a small relay there (`qemu_relay`) fixes QEMU 7.2's message order
//! before the vhost-user backend proper (listening on `<socket>.backend`) sees it.
//!
//! One worker thread serves both queues and the frame port: the port's rx fd is registered
//! edge-triggered in the worker's epoll, so a full guest rx ring does not spin the thread; the
//! frames wait in the port until the guest's next rx kick.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_net::FramePort;
use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{NetDeviceConfig, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use super::handler::NetHandler;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::qemu_relay;
use crate::vhost_user::dispatch::QueueDispatch;
use crate::vhost_user::{serve_with_setup, BackendHandle, ServeError};

/// The epoll id of the frame port's rx fd (ids up to `NUM_QUEUES` belong to the daemon).
const PORT_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// A running vhost-user-net server: `stop()` then `join()`, or drop it.
pub struct NetHandle {
    backend: Option<BackendHandle>,
    stop: Arc<EventFd>,
    relay: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl NetHandle {
    /// The socket QEMU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// How many frontend connections the backend has accepted so far.
    pub fn connections(&self) -> u64 {
        self.backend.as_ref().map_or(0, |b| b.connections())
    }

    /// Stop serving (the current connection is dropped); returns at once.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
        if let Some(b) = &self.backend {
            b.stop();
        }
    }

    /// Wait for the server threads to end.
    pub fn join(mut self) -> Result<(), ServeError> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), ServeError> {
        if let Some(t) = self.relay.take() {
            if t.join().is_err() {
                return Err(ServeError::Panicked(self.path.clone()));
            }
        }
        match self.backend.take() {
            Some(b) => b.join(),
            None => Ok(()),
        }
    }
}

impl Drop for NetHandle {
    fn drop(&mut self) {
        if self.relay.is_some() || self.backend.is_some() {
            self.stop();
            if let Err(e) = self.join_inner() {
                warn!("vhost-user-net {}: {e}", self.path.display());
            }
        }
    }
}

/// The vhost-user-net backend for one frontend connection.
pub struct NetBackend {
    config: NetDeviceConfig,
    handler: Mutex<NetHandler>,
    port_fd: RawFd,
    dispatch: QueueDispatch,
}

impl NetBackend {
    pub fn new(port: Arc<dyn FramePort>, mac: [u8; 6]) -> Self {
        let port_fd = port.rx_fd();
        NetBackend {
            config: NetDeviceConfig::new(mac),
            handler: Mutex::new(NetHandler::new(port)),
            port_fd,
            dispatch: QueueDispatch::new("vhost-user-net", NUM_QUEUES),
        }
    }

    fn serve_queue(&self, index: usize, vring: &VringRwLock) -> std::io::Result<()> {
        let mut handler = self
            .handler
            .lock()
            .map_err(|_| std::io::Error::other("net handler lock poisoned"))?;
        self.dispatch.serve(index, vring, |queue, mem| {
            if index == RX_QUEUE {
                handler.process_rx(queue, mem)
            } else {
                handler.process_tx(queue, mem)
            }
        })
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        // QEMU 7.2 crashes without PROTOCOL_FEATURES; its early SET_VRING_ENABLE is handled
        // by the relay in front of this backend (see `qemu_relay`).
        self.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if let Ok(mut h) = self.handler.lock() {
            h.set_acked_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.dispatch.clear_broken();
        if let Ok(mut h) = self.handler.lock() {
            h.reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The daemon sets the flag on each vring's queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read_config(offset, size).unwrap_or_default()
    }

    fn update_memory(
        &self,
        mem: GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    ) -> std::io::Result<()> {
        self.dispatch.update_memory(mem)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let (index, vring) = match device_event {
            e if usize::from(e) == RX_QUEUE || e == PORT_EVENT => (RX_QUEUE, vrings.get(RX_QUEUE)),
            e if usize::from(e) == TX_QUEUE => (TX_QUEUE, vrings.get(TX_QUEUE)),
            other => {
                return Err(std::io::Error::other(format!("unknown net event {other}")));
            }
        };
        let Some(vring) = vring else {
            return Err(std::io::Error::other("vring missing"));
        };
        self.serve_queue(index, vring)?;
        if index == TX_QUEUE {
            // Replies to what the guest just sent often arrive at once (the gateway answers
            // in the same turn); look at rx too rather than wait for the next edge.
            if let Some(rx) = vrings.get(RX_QUEUE) {
                self.serve_queue(RX_QUEUE, rx)?;
            }
        }
        Ok(())
    }
}

/// Serve a virtio-net device with MAC `mac` on `socket_path`, carrying frames over `port`,
/// until the handle is stopped. Each frontend connection (QEMU restarting the guest
/// included) gets a fresh backend; a guest reboot within a connection is a device reset.
pub fn spawn(
    socket_path: &Path,
    port: Arc<dyn FramePort>,
    mac: [u8; 6],
) -> Result<NetHandle, ServeError> {
    let inner = qemu_relay::backend_path(socket_path);
    let backend = serve_with_setup(
        "net",
        &inner,
        move || Arc::new(NetBackend::new(port.clone(), mac)),
        |backend: &Arc<NetBackend>, handlers| {
            let Some(h) = handlers.first() else {
                return Err(std::io::Error::other("no vring worker"));
            };
            h.register_listener(
                backend.port_fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(PORT_EVENT),
            )
        },
    )?;
    let _ = std::fs::remove_file(socket_path);
    let listener = UnixListener::bind(socket_path).map_err(|e| ServeError::Backend {
        path: socket_path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServeError::EventFd)?);
    let s = stop.clone();
    let relay = std::thread::Builder::new()
        .name("vu-net-relay".into())
        .spawn(move || qemu_relay::run(listener, inner, s))
        .map_err(ServeError::Thread)?;
    Ok(NetHandle {
        backend: Some(backend),
        stop,
        relay: Some(relay),
        path: socket_path.to_path_buf(),
    })
}
