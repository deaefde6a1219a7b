//! A thread that serves a device's queues: it waits on their kick eventfds and runs the
//! device's request logic, then raises the interrupt if the guest must be told.
//!
//! blk's in-process device (`devices/block/in_process.rs`) runs one per queue. net and vsock
//! do not use it: they must also wait on the frame port or the host sockets, which this
//! worker does not, so each runs a thread of its own (their `in_process.rs`).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceQueue, Interrupt};

/// Request logic over one queue, as [`QueueWorker`] runs it (blk's handler implements it).
pub trait QueueHandler: Send + 'static {
    /// Serve what the driver made available on queue `index`; return true when the used
    /// ring changed in a way the driver must be interrupted for.
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}

/// A running worker; dropping it (or [`QueueWorker::stop`]) ends the thread.
pub struct QueueWorker {
    stop: EventFd,
    thread: Option<JoinHandle<Vec<DeviceQueue>>>,
}

const STOP_TOKEN: u64 = u64::MAX;

impl QueueWorker {
    /// Serve `queues` with `handler` on a new thread named `name`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        mut handler: H,
        mem: GuestMemoryMmap,
        mut queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<QueueWorker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); queues.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!("queue worker epoll: {e}");
                            return queues;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == STOP_TOKEN {
                            let _ = stop2.read();
                            return queues;
                        }
                        let Some(q) = queues.get_mut(token as usize) else {
                            continue;
                        };
                        // Drain the counter; a spurious wake-up just finds nothing to do.
                        let _ = q.kick.read();
                        if handler.process_queue(q.index, &mut q.queue, &mem) {
                            if let Err(e) = interrupt.signal_used_queue() {
                                tracing::warn!("raising the queue interrupt: {e}");
                            }
                        }
                    }
                }
            })?;
        Ok(QueueWorker {
            stop,
            thread: Some(thread),
        })
    }

    /// End the thread and get the queues back.
    pub fn stop(mut self) -> Vec<DeviceQueue> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Vec<DeviceQueue> {
        let _ = self.stop.write(1);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(q)) => q,
            _ => Vec::new(),
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}
