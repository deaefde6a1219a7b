//! The per-queue plumbing every kiln vhost-user backend needs around its device logic: the
//! guest memory the frontend mapped, which queues turned out broken, and turning one pass of
//! the device logic over a vring into "signal the guest" or "stop this queue until reset".
//!
//! blk and net hold a [`QueueDispatch`] and call [`QueueDispatch::serve`] from their
//! `handle_event` with a closure that runs their in-order handler on the queue; the closure
//! is the only device-specific part.

use std::fmt::Display;
use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::GuestMem;

/// Memory, broken-queue flags and the serve-one-queue step shared by the vhost-user backends.
pub struct QueueDispatch {
    /// The device's name in logs ("vhost-user-blk", ...).
    device: &'static str,
    mem: RwLock<Option<GuestMem>>,
    /// Queues whose ring turned out broken: left alone until the device is reset.
    broken: Mutex<Vec<bool>>,
}

impl QueueDispatch {
    /// Plumbing for a device with `queues` queues, no memory table yet.
    pub fn new(device: &'static str, queues: usize) -> Self {
        QueueDispatch {
            device,
            mem: RwLock::new(None),
            broken: Mutex::new(vec![false; queues]),
        }
    }

    /// The frontend sent a (new) memory table.
    pub fn update_memory(&self, mem: GuestMem) -> std::io::Result<()> {
        let mut m = self
            .mem
            .write()
            .map_err(|_| std::io::Error::other("memory lock poisoned"))?;
        *m = Some(mem);
        Ok(())
    }

    /// Give every queue stopped as broken another chance (device reset or re-negotiation).
    pub fn clear_broken(&self) {
        if let Ok(mut b) = self.broken.lock() {
            b.iter_mut().for_each(|x| *x = false);
        }
    }

    /// Whether queue `index` was stopped as broken (an unknown index counts as broken).
    pub fn is_broken(&self, index: usize) -> bool {
        self.broken
            .lock()
            .map(|b| b.get(index).copied().unwrap_or(true))
            .unwrap_or(true)
    }

    /// [`QueueDispatch::serve`] for device logic that signals the guest itself, as each
    /// request completes: `process` gets a `signal` that writes the vring's call eventfd
    /// (a failed write is logged; the guest then sees the completion on its next interrupt),
    /// and the guest memory as an `Arc`, so it can hand requests to other threads.
    pub fn serve_signalling<E, F>(
        &self,
        index: usize,
        vring: &VringRwLock,
        process: F,
    ) -> std::io::Result<()>
    where
        E: Display,
        F: FnOnce(&mut Queue, &Arc<GuestMemoryMmap<()>>, &mut dyn FnMut()) -> Result<(), E>,
    {
        let device = self.device;
        self.serve_state(index, vring, |state, mem| {
            // The queue and the call eventfd both live in the vring state: the queue is
            // moved out while the requests run (no one else can see the state meanwhile: this
            // holds its write lock), so the eventfd can be written without a dup per kick.
            let mut queue = std::mem::take(state.get_queue_mut());
            let result = {
                let call = state.get_call().as_ref();
                let mut signal = || {
                    if let Some(c) = call {
                        if let Err(e) = c.notify() {
                            warn!(queue = index, "{device}: signalling the guest: {e}");
                        }
                    }
                };
                process(&mut queue, mem, &mut signal)
            };
            *state.get_queue_mut() = queue;
            result.map(|()| false)
        })
    }

    /// Run `process` over queue `index` of `vring` and signal the guest when it says so.
    ///
    /// Nothing runs for a queue stopped as broken, a ring not yet set up and enabled, or
    /// before the memory table. An error from `process` means the ring itself is unusable
    /// (a lying avail index, a ring outside memory): it is logged and the queue is left
    /// alone until [`QueueDispatch::clear_broken`]; the worker thread keeps serving the
    /// other queues, so the `Ok` return is deliberate.
    pub fn serve<E, F>(&self, index: usize, vring: &VringRwLock, process: F) -> std::io::Result<()>
    where
        E: Display,
        F: FnOnce(&mut Queue, &GuestMemoryMmap<()>) -> Result<bool, E>,
    {
        self.serve_state(index, vring, |state, mem| {
            process(state.get_queue_mut(), mem)
        })
    }

    /// [`QueueDispatch::serve`] with the whole vring state (queue and eventfds) in hand.
    fn serve_state<E, F>(
        &self,
        index: usize,
        vring: &VringRwLock,
        process: F,
    ) -> std::io::Result<()>
    where
        E: Display,
        F: FnOnce(&mut VringState<GuestMem>, &Arc<GuestMemoryMmap<()>>) -> Result<bool, E>,
    {
        if self.is_broken(index) {
            return Ok(());
        }
        {
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                // Work (a kick, a frame from the port) waits until the ring is usable.
                return Ok(());
            }
        }
        let Some(mem) = self.mem.read().ok().and_then(|m| m.clone()) else {
            warn!("{}: event before the memory table", self.device);
            return Ok(());
        };
        let guard = mem.memory().into_inner();
        let notify = {
            let mut state = vring.get_mut();
            process(&mut state, &guard)
        };
        match notify {
            Ok(true) => vring.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e) => {
                error!(
                    queue = index,
                    "{}: queue stopped until reset: {e}", self.device
                );
                if let Ok(mut b) = self.broken.lock() {
                    if let Some(x) = b.get_mut(index) {
                        *x = true;
                    }
                }
                Ok(())
            }
        }
    }
}
