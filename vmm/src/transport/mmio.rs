//! virtio-mmio, version 2 (virtio 1.x section 4.2.2), as a bus device.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use tracing::{debug, warn};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, DeviceQueue, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
/// Vendor ID kiln reports ("KILN" would not fit the convention; QEMU's is 0x554d4551).
pub const VENDOR_ID: u32 = 0x4e4c_494b; // "KILN"

pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    features_sel: u32,
    acked_features: u64,
    acked_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("creating queue {0} of size {1}: {2}")]
    Queue(usize, u16, virtio_queue::Error),
    #[error("registering {what} with KVM: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl MmioTransport {
    /// Wrap `device` for the window at `base`. When `vm` is given, each queue's kick
    /// eventfd is registered as an ioeventfd on QueueNotify (matching the queue index) and
    /// the interrupt eventfd as an irqfd on `gsi`; without `vm` (unit tests) notifications
    /// arrive as bus writes and the interrupt is only the eventfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        vm: Option<&VmFd>,
        base: u64,
        gsi: u32,
    ) -> Result<MmioTransport, TransportError> {
        let sizes = device.queue_max_sizes();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut kicks = Vec::with_capacity(sizes.len());
        for (i, &max) in sizes.iter().enumerate() {
            queues.push(Queue::new(max).map_err(|e| TransportError::Queue(i, max, e))?);
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?;
            if let Some(vm) = vm {
                vm.register_ioevent(
                    &kick,
                    &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(|source| TransportError::Kvm {
                    what: "a queue ioeventfd",
                    source,
                })?;
            }
            kicks.push(kick);
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        if let Some(vm) = vm {
            vm.register_irqfd(&irqfd, gsi)
                .map_err(|source| TransportError::Kvm {
                    what: "the device irqfd",
                    source,
                })?;
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            kicks,
            features_sel: 0,
            acked_features: 0,
            acked_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only before the queue is enabled and the device runs.
    fn queue_writable(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.selected_queue().filter(|q| !q.ready())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.features_sel = 0;
        self.acked_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (except by resetting).
        let added = v & !self.status;
        if v & self.status != self.status {
            warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {v:#x})",
                self.status
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let ok = self.acked_features & !self.offered_features() == 0
                && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                debug!("virtio-mmio: refusing features {:#x}", self.acked_features);
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let needed =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            if v & needed != needed {
                self.status |= VIRTIO_CONFIG_S_FAILED;
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                warn!("virtio-mmio: queue {i} is not valid in guest memory");
                self.status |= VIRTIO_CONFIG_S_FAILED;
                return;
            }
            q.set_event_idx(event_idx);
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    warn!("virtio-mmio: cloning a kick eventfd: {e}");
                    self.status |= VIRTIO_CONFIG_S_FAILED;
                    return;
                }
            };
            queues.push(DeviceQueue {
                index: i as u16,
                queue: match copy_queue(q) {
                    Ok(q) => q,
                    Err(e) => {
                        warn!("virtio-mmio: queue {i}: {e}");
                        self.status |= VIRTIO_CONFIG_S_FAILED;
                        return;
                    }
                },
                kick,
            });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features,
            queues,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn!(
                    "virtio-mmio: activating device type {}: {e}",
                    self.device.device_type()
                );
                self.status |= VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            _ => {
                debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.acked_sel = v,
            reg::DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    match self.acked_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_writable() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    if v == 0 {
                        q.set_ready(false);
                    } else if v == 1 {
                        q.set_ready(true);
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Reached only when the ioeventfd is not registered (unit tests) or the
                // write did not match it: forward to the kick eventfd.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.queue_writable() {
                    q.set_desc_table_address(Some(v), None)
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.queue_writable() {
                    q.set_desc_table_address(None, Some(v))
                }
            }
            reg::QUEUE_DRIVER_LOW => {
                if let Some(q) = self.queue_writable() {
                    q.set_avail_ring_address(Some(v), None)
                }
            }
            reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.queue_writable() {
                    q.set_avail_ring_address(None, Some(v))
                }
            }
            reg::QUEUE_DEVICE_LOW => {
                if let Some(q) = self.queue_writable() {
                    q.set_used_ring_address(Some(v), None)
                }
            }
            reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.queue_writable() {
                    q.set_used_ring_address(None, Some(v))
                }
            }
            reg::SHM_SEL => {}
            _ => debug!("virtio-mmio: write of {v:#x} to register {offset:#x}"),
        }
    }
}

/// A device-side copy of the driver-configured queue (the transport keeps its own to
/// answer register reads; `Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> Result<Queue, virtio_queue::Error> {
    let mut n = Queue::new(q.max_size())?;
    n.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.desc_table());
    n.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    n.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    n.set_used_ring_address(lo, hi);
    n.set_event_idx(q.event_idx_enabled());
    n.set_next_avail(q.next_avail());
    n.set_next_used(q.next_used());
    n.set_ready(q.ready());
    Ok(n)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be read whole.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

/// Drive a transport over a dummy device with arbitrary register reads and writes.
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    struct Null;
    impl VirtioDevice for Null {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 4]
        }
        fn features(&self) -> u64 {
            u64::MAX >> 8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::read_config_bytes(&[7u8; 60], offset, data)
        }
        fn activate(&mut self, _ctx: ActivateContext) -> Result<(), super::ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 10)]) else {
        return;
    };
    let Ok(mut t) = MmioTransport::new(Box::new(Null), mem, None, 0, 5) else {
        return;
    };
    for op in data.chunks(7) {
        if op.len() < 7 {
            break;
        }
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let len = [1usize, 2, 4, 8][(op[0] >> 1) as usize % 4];
        if op[0] & 1 == 0 {
            let mut b = vec![0u8; len];
            t.read(offset, &mut b);
        } else {
            let mut b = op[3..7].to_vec();
            b.resize(len, 0);
            t.write(offset, &b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{read_config_bytes, ActivateError, INT_VRING};
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Seen {
        activations: usize,
        resets: usize,
        queues: Vec<u16>,
        features: u64,
    }

    struct Dummy(Arc<Mutex<Seen>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 8]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(b"kilncfg", offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let mut s = self.0.lock().unwrap();
            s.activations += 1;
            s.queues = ctx.queues.iter().map(|q| q.queue.size()).collect();
            s.features = ctx.acked_features;
            ctx.interrupt.signal_used_queue()?;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = MmioTransport::new(Box::new(Dummy(seen.clone())), mem, None, 0, 5).unwrap();
        (t, seen)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identification_and_features() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        let mut cfg = [0u8; 8];
        t.read(reg::CONFIG + 4, &mut cfg);
        assert_eq!(&cfg, b"cfg\0\0\0\0\0");
        // Misaligned or narrow register access reads zero.
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
    }

    fn drive_to_ok(t: &mut MmioTransport, features_hi: u32) {
        w(t, reg::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1 << 3);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        w(t, reg::STATUS, s);
    }

    #[test]
    fn full_handshake_activates_with_ready_queues() {
        let (mut t, seen) = transport();
        drive_to_ok(&mut t, 1);
        assert_ne!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // A ready queue's registers no longer change.
        w(&mut t, reg::QUEUE_NUM, 4);
        let s = r(&mut t, reg::STATUS);
        w(&mut t, reg::STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(t.is_activated());
        {
            let s = seen.lock().unwrap();
            assert_eq!((s.activations, s.queues.clone()), (1, vec![8]));
            assert_eq!(s.features, (1 << 32) | (1 << 3));
        }
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset returns to the initial state and tells the device.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(
            (r(&mut t, reg::STATUS), seen.lock().unwrap().resets),
            (0, 1)
        );
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn refuses_features_without_version_1_or_not_offered() {
        let (mut t, _) = transport();
        drive_to_ok(&mut t, 0);
        assert_eq!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let (mut t, _) = transport();
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        drive_to_ok(&mut t, 1);
        // drive_to_ok rewrote word 0 to the offered bit, so this one passes...
        assert_ne!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let (mut t, _) = transport();
        drive_to_ok(&mut t, 1 | 2);
        assert_eq!(
            r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "bit 33 not offered"
        );
    }

    #[test]
    fn driver_ok_without_features_ok_fails() {
        let (mut t, seen) = transport();
        w(
            &mut t,
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(
            &mut t,
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
        assert_eq!(seen.lock().unwrap().activations, 0);
    }

    #[test]
    fn notify_without_ioeventfd_reaches_the_kick() {
        let (mut t, _) = transport();
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.kicks[1].read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
    }

    /// Arbitrary register traffic never panics (the fuzz target runs the same function).
    #[test]
    fn random_register_traffic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut data = vec![0u8; 4096];
        for _ in 0..300 {
            for b in data.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            fuzz_entry(&data[..(seed as usize % data.len())]);
        }
    }
}
