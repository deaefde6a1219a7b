//! virtio-blk on kiln's own transport ([`crate::transport`], the `kvm` engine): blk's
//! request logic ([`BlockHandler`]) served by a [`QueueWorker`] per queue, each queue's
//! requests scheduled by its [`IoPool`] exactly as over vhost-user (side by side, completed
//! as they finish, FLUSH a barrier). The device semantics (features, config space,
//! requests) live in [`super::device`] and [`super::handler`]; this file only plugs them
//! into [`VirtioDevice`].

use std::path::Path;
use std::sync::Arc;

use kiln_disk::BlockDevice;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::{BlockDeviceConfig, BlockOptions, QUEUE_SIZE, VIRTIO_ID_BLOCK};
use super::handler::BlockHandler;
use super::scheduler::IoPool;
use crate::machine::MachineError;
use crate::transport::{
    ActivateContext, ActivateError, Interrupt, QueueHandler, QueueWorker, VirtioDevice,
};

/// A virtio-blk device for the in-process transport.
pub struct VirtioBlock {
    disk: Arc<dyn BlockDevice>,
    config: BlockDeviceConfig,
    workers: Vec<QueueWorker>,
}

impl VirtioBlock {
    pub fn new(disk: Arc<dyn BlockDevice>, opts: &BlockOptions) -> VirtioBlock {
        let config = BlockDeviceConfig::new(disk.size(), disk.read_only(), opts);
        VirtioBlock {
            disk,
            config,
            workers: Vec::new(),
        }
    }

    /// Open an image (raw or qcow2, probed) writable, with default options.
    pub fn open(path: &Path) -> Result<VirtioBlock, MachineError> {
        Self::open_with(path, false, "")
    }

    /// Open an image (raw or qcow2, probed), read-only if asked (the guest then sees
    /// VIRTIO_BLK_F_RO and writes fail), answering GET_ID with `serial` (cut to 20 bytes).
    pub fn open_with(
        path: &Path,
        read_only: bool,
        serial: &str,
    ) -> Result<VirtioBlock, MachineError> {
        let opts = kiln_disk::OpenOptions {
            read_only,
            ..Default::default()
        };
        let disk = kiln_disk::open(path, opts)
            .map_err(|e| MachineError::Config(format!("disk {}: {e}", path.display())))?;
        let block = BlockOptions {
            read_only,
            serial: serial.to_string(),
            ..BlockOptions::default()
        };
        Ok(VirtioBlock::new(disk, &block))
    }
}

/// One queue's request logic and its I/O workers (stopped and joined when the queue's
/// worker ends).
struct BlockQueue {
    handler: BlockHandler,
    pool: IoPool<GuestMemoryMmap>,
    /// The guest memory, shared with requests running on the pool's threads.
    mem: Arc<GuestMemoryMmap>,
    /// Completions are signalled as they land, not once per kick, as over vhost-user.
    interrupt: Arc<Interrupt>,
}

impl QueueHandler for BlockQueue {
    fn process_queue(&mut self, index: u16, queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
        let interrupt = &self.interrupt;
        let mut signal = || {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("raising the queue interrupt: {e}");
            }
        };
        if let Err(e) = self
            .pool
            .serve(&mut self.handler, queue, &self.mem, &mut signal)
        {
            // A broken ring: the driver is told nothing more on this queue until reset.
            tracing::warn!("virtio-blk queue {index}: {e}");
        }
        false
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.config.num_queues)]
    }

    fn features(&self) -> u64 {
        self.config.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let got = u32::try_from(offset)
            .ok()
            .and_then(|o| self.config.read_config(o, data.len() as u32));
        match got {
            Some(v) => data.copy_from_slice(&v),
            None => data.fill(0),
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.workers.clear();
        let mem = Arc::new(ctx.mem.clone());
        for q in ctx.queues {
            let mut handler = BlockHandler::new(self.disk.clone(), self.config.clone());
            handler.set_acked_features(ctx.acked_features);
            let pool = IoPool::new(&handler);
            let queue = BlockQueue {
                handler,
                pool,
                mem: mem.clone(),
                interrupt: ctx.interrupt.clone(),
            };
            let name = format!("kiln-blk-q{}", q.index);
            self.workers.push(QueueWorker::spawn(
                &name,
                queue,
                ctx.mem.clone(),
                vec![q],
                ctx.interrupt.clone(),
            )?);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread.
        self.workers.clear();
    }
}
