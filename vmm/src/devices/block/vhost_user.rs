//! virtio-blk served to QEMU as a vhost-user-blk backend, on the same request logic as the
//! in-process device ([`super::handler`]).
//!
//! ```text
//! -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem
//! -chardev socket,id=blk0,path=<socket>
//! -device vhost-user-blk-pci,chardev=blk0,num-queues=<N>     (N <= BlockOptions::num_queues)
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_disk::BlockDevice;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{BlockDeviceConfig, BlockOptions, QUEUE_SIZE};
use super::handler::BlockHandler;
use super::scheduler::IoPool;
use crate::vhost_user::dispatch::QueueDispatch;
use crate::vhost_user::{serve, BackendHandle, ServeError};

/// The vhost-user-blk backend for one frontend connection.
pub struct BlockBackend {
    config: BlockDeviceConfig,
    /// One handler per queue; each queue is served by its own vring thread, which runs
    /// requests side by side on the queue's [`IoPool`].
    queues: Vec<Mutex<QueueState>>,
    dispatch: QueueDispatch,
}

/// One queue's request logic and its I/O workers (stopped and joined when the backend,
/// i.e. the frontend connection, goes away).
struct QueueState {
    handler: BlockHandler,
    pool: IoPool<GuestMemoryMmap<()>>,
}

impl BlockBackend {
    pub fn new(disk: Arc<dyn BlockDevice>, opts: &BlockOptions) -> Self {
        let config = BlockDeviceConfig::new(disk.size(), disk.read_only(), opts);
        let n = usize::from(config.num_queues);
        BlockBackend {
            queues: (0..n)
                .map(|_| {
                    let handler = BlockHandler::new(disk.clone(), config.clone());
                    let pool = IoPool::new(&handler);
                    Mutex::new(QueueState { handler, pool })
                })
                .collect(),
            config,
            dispatch: QueueDispatch::new("vhost-user-blk", n),
        }
    }

    fn serve_queue(&self, index: usize, vring: &VringRwLock) -> std::io::Result<()> {
        let mut guard = self.queues[index]
            .lock()
            .map_err(|_| std::io::Error::other("queue handler lock poisoned"))?;
        let QueueState { handler, pool } = &mut *guard;
        self.dispatch
            .serve_signalling(index, vring, |queue, mem, signal| {
                pool.serve(handler, queue, mem, signal)
            })
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        // SET_FEATURES starts every (re)initialisation of the device, e.g. after the guest
        // rebooted inside the same QEMU: a queue stopped as broken gets another chance.
        self.dispatch.clear_broken();
        for q in &self.queues {
            if let Ok(mut q) = q.lock() {
                q.handler.set_acked_features(features);
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.dispatch.clear_broken();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues carry the flag themselves (the daemon sets it on each vring).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty answer tells the frontend the request failed.
        self.config.read_config(offset, size).unwrap_or_default()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // Nothing in the blk config is writable here (no CONFIG_WCE).
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> std::io::Result<()> {
        self.dispatch.update_memory(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue, so a multi-queue guest gets parallel I/O.
        (0..self.config.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        // Each thread owns exactly one queue: `thread_id` is the queue index and
        // `device_event` the index inside this thread's vrings (always 0).
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(std::io::Error::other(format!(
                "unknown vring event {device_event}"
            )));
        };
        if thread_id >= self.queues.len() {
            return Err(std::io::Error::other(format!("unknown worker {thread_id}")));
        }
        self.serve_queue(thread_id, vring)
    }
}

/// Serve `disk` as vhost-user-blk on `socket_path` until the handle is stopped. Each
/// frontend connection (QEMU restarting the guest included) gets a fresh backend.
pub fn spawn(
    socket_path: &Path,
    disk: Arc<dyn BlockDevice>,
    opts: BlockOptions,
) -> Result<BackendHandle, ServeError> {
    serve("blk", socket_path, move || {
        Arc::new(BlockBackend::new(disk.clone(), &opts))
    })
}
