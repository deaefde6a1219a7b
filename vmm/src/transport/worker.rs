//! The thread that serves an in-process device: it waits on its queues' kick eventfds and on
//! any file descriptors of the device's own (net's frame port, vsock's host sockets), runs
//! the device's [`QueueHandler`], and raises the interrupt when the guest must be told.
//!
//! Every in-process device runs on it: blk one worker per queue
//! (`devices/block/in_process.rs`), net and vsock one for all their queues and their extra
//! file descriptors (`devices/net/in_process.rs`, `devices/vsock/in_process.rs`). Cloud
//! Hypervisor's `EpollHelper` is the model: one loop, and a handler told which event fired.

use std::any::Any;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, DeviceQueue, Interrupt};

/// A file descriptor of the device's own for the worker to wait on besides the kicks.
#[derive(Clone, Copy, Debug)]
pub struct ExtraFd {
    pub fd: RawFd,
    /// What to wait for (e.g. `IN`, with `EDGE_TRIGGERED` for a port drained to empty).
    pub events: EventSet,
    /// Handed back to [`QueueHandler::handle_event`].
    pub id: u64,
}

/// A device's request logic as [`QueueWorker`] runs it. Each method returns true when the
/// used rings changed in a way the driver must be interrupted for; the worker raises the
/// interrupt at most once per wake-up.
pub trait QueueHandler: Send + 'static {
    /// The file descriptors to wait on besides the queue kicks, asked once at spawn. They
    /// must stay open as long as the handler lives (the handler usually owns them).
    fn extra_fds(&self) -> Vec<ExtraFd> {
        Vec::new()
    }

    /// The driver notified queue `index` (its kick counter is already drained).
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;

    /// The extra file descriptor registered with `id` is ready.
    fn handle_event(&mut self, _id: u64, _mem: &GuestMemoryMmap) -> bool {
        false
    }

    /// Every event of one wake-up was handled, for work that follows from several of them
    /// at once (net serves tx before rx; vsock fills RX after kicks and host data). Also
    /// called once before the first wait, for work that arrived before the driver was
    /// ready. `queues` are the worker's, in the order they were given to
    /// [`QueueWorker::spawn`].
    fn events_done(&mut self, _queues: &mut [DeviceQueue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
}

/// Why a worker did not start. The handler comes back unless it was already moved to a
/// thread that could not be created.
pub struct SpawnError<H> {
    pub source: std::io::Error,
    pub handler: Option<H>,
}

impl<H> std::fmt::Debug for SpawnError<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnError")
            .field("source", &self.source)
            .field("handler_back", &self.handler.is_some())
            .finish()
    }
}

impl<H> std::fmt::Display for SpawnError<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "starting a queue worker: {}", self.source)
    }
}

impl<H> std::error::Error for SpawnError<H> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl<H> From<SpawnError<H>> for ActivateError {
    fn from(e: SpawnError<H>) -> ActivateError {
        ActivateError::Io(e.source)
    }
}

/// What an epoll token stands for.
#[derive(Clone, Copy)]
enum Source {
    Stop,
    /// A queue, by its position in the worker's queues.
    Queue(usize),
    Extra(u64),
}

/// A running worker; dropping it (or [`QueueWorker::stop`]) ends the thread.
pub struct QueueWorker {
    stop: EventFd,
    /// Returns the handler, boxed so that a device can hold its worker without naming the
    /// handler's type.
    thread: Option<JoinHandle<Box<dyn Any + Send>>>,
}

impl QueueWorker {
    /// Serve `queues` and the handler's extra file descriptors with `handler` on a new
    /// thread named `name`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        handler: H,
        mem: GuestMemoryMmap,
        queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<QueueWorker, SpawnError<H>> {
        let (epoll, sources, stop, stop2) = match event_set(&handler, &queues) {
            Ok(set) => set,
            Err(source) => {
                return Err(SpawnError {
                    source,
                    handler: Some(handler),
                })
            }
        };
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || -> Box<dyn Any + Send> {
                Box::new(run(handler, epoll, &sources, stop, mem, queues, &interrupt))
            })
            .map_err(|source| SpawnError {
                source,
                handler: None,
            })?;
        Ok(QueueWorker {
            stop: stop2,
            thread: Some(thread),
        })
    }

    /// End the thread and get its handler back: `None` if the thread panicked (or `H` is
    /// not the type the worker was spawned with).
    pub fn stop<H: QueueHandler>(mut self) -> Option<H> {
        self.stop_inner()?.downcast().ok().map(|h| *h)
    }

    fn stop_inner(&mut self) -> Option<Box<dyn Any + Send>> {
        let _ = self.stop.write(1);
        self.thread.take()?.join().ok()
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

/// The epoll set of a worker (the stop eventfd, every kick, every extra fd; the token of each
/// is its position in the returned sources), and the stop eventfd twice: the thread's and
/// the [`QueueWorker`]'s.
fn event_set<H: QueueHandler>(
    handler: &H,
    queues: &[DeviceQueue],
) -> std::io::Result<(Epoll, Vec<Source>, EventFd, EventFd)> {
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    let mut sources = Vec::new();
    let mut add = |fd: RawFd, events: EventSet, source: Source| {
        let token = sources.len() as u64;
        sources.push(source);
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    };
    add(stop.as_raw_fd(), EventSet::IN, Source::Stop)?;
    for (i, q) in queues.iter().enumerate() {
        add(q.kick.as_raw_fd(), EventSet::IN, Source::Queue(i))?;
    }
    for x in handler.extra_fds() {
        add(x.fd, x.events, Source::Extra(x.id))?;
    }
    let stop2 = stop.try_clone()?;
    Ok((epoll, sources, stop, stop2))
}

fn run<H: QueueHandler>(
    mut handler: H,
    epoll: Epoll,
    sources: &[Source],
    stop: EventFd,
    mem: GuestMemoryMmap,
    mut queues: Vec<DeviceQueue>,
    interrupt: &Interrupt,
) -> H {
    let mut events = vec![EpollEvent::default(); sources.len()];
    let mut notify = handler.events_done(&mut queues, &mem);
    loop {
        if notify {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("raising the queue interrupt: {e}");
            }
        }
        notify = false;
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("queue worker epoll: {e}");
                return handler;
            }
        };
        for ev in &events[..n] {
            match sources.get(ev.data() as usize) {
                Some(Source::Stop) => {
                    let _ = stop.read();
                    return handler;
                }
                Some(Source::Queue(i)) => {
                    let q = &mut queues[*i];
                    // Drain the counter; a spurious wake-up just finds nothing to do.
                    let _ = q.kick.read();
                    notify |= handler.process_queue(q.index, &mut q.queue, &mem);
                }
                Some(Source::Extra(id)) => notify |= handler.handle_event(*id, &mem),
                None => {}
            }
        }
        notify |= handler.events_done(&mut queues, &mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    /// Counts what the worker hands it; owns the extra fd it asks to be woken by.
    struct Counter {
        fd: EventFd,
        events: Arc<AtomicUsize>,
        rounds: usize,
    }

    impl QueueHandler for Counter {
        fn extra_fds(&self) -> Vec<ExtraFd> {
            vec![ExtraFd {
                fd: self.fd.as_raw_fd(),
                events: EventSet::IN,
                id: 7,
            }]
        }

        fn process_queue(&mut self, _: u16, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
            false
        }

        fn handle_event(&mut self, id: u64, _: &GuestMemoryMmap) -> bool {
            assert_eq!(id, 7);
            let _ = self.fd.read();
            self.events.fetch_add(1, Ordering::SeqCst);
            true
        }

        fn events_done(&mut self, _: &mut [DeviceQueue], _: &GuestMemoryMmap) -> bool {
            self.rounds += 1;
            false
        }
    }

    #[test]
    fn extra_fds_wake_the_worker_and_the_handler_comes_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let poke = fd.try_clone().unwrap();
        let events = Arc::new(AtomicUsize::new(0));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let handler = Counter {
            fd,
            events: events.clone(),
            rounds: 0,
        };
        let worker =
            QueueWorker::spawn("test-worker", handler, mem, Vec::new(), interrupt.clone()).unwrap();
        poke.write(1).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while events.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < end,
                "the extra fd never woke the worker"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // The interrupt is raised before the worker waits again; give it that moment.
        while interrupt.status() & crate::transport::INT_VRING == 0 {
            assert!(
                std::time::Instant::now() < end,
                "no interrupt after the event"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let back: Counter = worker.stop().expect("the handler comes back");
        // Once before the first wait, once after the event's wake-up.
        assert_eq!(back.rounds, 2);
    }
}
