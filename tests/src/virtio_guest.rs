//! A tiny virtio driver for KVM tests: one small long-mode program, assembled here with
//! iced-x86, that runs a *script* of generic steps the test writes into guest memory.
//!
//! The guest does all the driving itself, through the device's virtio-mmio registers and
//! rings in its own memory: the steps are "store this value at this address" (a register,
//! a descriptor, an avail ring entry, QueueNotify), "check the value at this address",
//! "halt until the value at this address reaches N" (a used ring index; the vCPU sleeps in
//! `hlt` and only the device's interrupt, an irqfd through the PIC, wakes it), "copy",
//! "compare" and "print". The helpers on [`Script`] turn virtio operations (the init
//! handshake, submitting a descriptor chain, waiting for the used ring) into such steps,
//! so each test reads as a driver would be written, and the guest program stays the same
//! for every device.
//!
//! A failed check prints `FAIL op=NNNN got=VALUE` and powers off; [`Script::verdict`] maps
//! the op number back to the description the test gave the step.

use iced_x86::code_asm::*;

/// Where the interpreter is loaded and entered.
pub const CODE: u64 = 0x10_0000;
/// One interrupt handler per device, 256 bytes apart.
const HANDLERS: u64 = 0x10_8000;
/// Hex digits and the failure message's words.
const CONSTS: u64 = 0x10_c000;
/// The IDT (vectors 0x20..0x30 used) and its descriptor.
const IDT: u64 = 0x3000;
const IDTR: u64 = 0x3f00;
/// Per device: interrupt count (u64) then the OR of every InterruptStatus seen (u64).
pub const IRQ_AREA: u64 = 0x4000;
/// The script: 32-byte steps.
const SCRIPT: u64 = 0x20_0000;
const SCRIPT_END: u64 = 0x40_0000;
/// Buffers, rings and expected data handed out by [`Script::alloc`].
const DATA: u64 = 0x40_0000;
/// Guest memory the test VMs get; the data area must stay inside it.
pub const GUEST_MEMORY: u64 = 64 << 20;

const PIC_VECTOR_BASE: u64 = 0x20;
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_STRIDE: u64 = 0x1000;
/// GSI of device 0 (the PIC's IRQ 5); device i gets 5 + i.
const FIRST_IRQ: u64 = 5;
/// `SLP_EN | SLP_TYP(5)` to the ACPI power port: S5, the VM ends with `Poweroff`.
pub const POWEROFF: u32 = 0x34;
/// Written to the ACPI power port instead, it resets the VM (`Reset`).
pub const RESET: u32 = 0xfe;
/// The byte the END step writes to the ACPI power port ([`POWEROFF`] unless a step
/// stores another value here: a script can end in a reset, or decide from data it read).
pub const END_VALUE: u64 = CONSTS + 0x40;

mod op {
    pub const END: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const EXPECT: u8 = 2;
    pub const WAIT: u8 = 3;
    pub const COPY: u8 = 4;
    pub const CMP: u8 = 5;
    pub const PUTS: u8 = 6;
    pub const PUTHEX: u8 = 7;
}

/// virtio-mmio register offsets (virtio 1.x, 4.2.2), from Linux's own header (virtio-bindings'
/// `virtio_mmio`). kiln-vmm's KVM tests check at build time that its transport uses the same
/// offsets, so a wrong offset in the transport fails the build instead of agreeing with itself.
pub mod reg {
    use virtio_bindings::virtio_mmio as linux;

    pub const MAGIC: u64 = linux::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = linux::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = linux::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const DEVICE_FEATURES: u64 = linux::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = linux::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = linux::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = linux::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = linux::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = linux::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = linux::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = linux::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = linux::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = linux::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const STATUS: u64 = linux::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = linux::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = linux::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = linux::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = linux::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = linux::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = linux::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG: u64 = linux::VIRTIO_MMIO_CONFIG as u64;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
}

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTQ_DESC_F_NEXT: u64 = 1;
const VIRTQ_DESC_F_WRITE: u64 = 2;

/// A virtio-mmio device of the VM, as `Machine` places them: the `index`-th device given
/// to the `VmConfig` builder.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub index: usize,
}

impl Device {
    pub fn new(index: usize) -> Device {
        assert!(
            index < 3,
            "the guest program serves the first three devices"
        );
        Device { index }
    }
    pub fn base(&self) -> u64 {
        MMIO_BASE + self.index as u64 * MMIO_STRIDE
    }
    pub fn reg(&self, offset: u64) -> u64 {
        self.base() + offset
    }
    /// Address of the interrupt counter the guest's handler keeps for this device.
    pub fn irq_count(&self) -> u64 {
        IRQ_AREA + 16 * self.index as u64
    }
    /// Address of the OR of every InterruptStatus the handler read for this device.
    pub fn irq_status_seen(&self) -> u64 {
        self.irq_count() + 8
    }
}

/// A split virtqueue in guest memory, with the driver's bookkeeping (which the script
/// advances as it emits steps: the guest executes them in the same order).
#[derive(Debug)]
pub struct Virtq {
    pub dev: Device,
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    /// Used entries the script has waited for so far.
    pub used_seen: u16,
}

impl Virtq {
    /// Address of used ring element `n` (counted from the start, wrapping with the ring).
    pub fn used_elem(&self, n: u16) -> u64 {
        self.used + 4 + 8 * u64::from(n % self.size)
    }
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub enum Buf {
    /// Device-readable: `(guest address, length)`.
    R(u64, u32),
    /// Device-writable.
    W(u64, u32),
}

/// The script being written, the data it refers to, and what each step means.
pub struct Script {
    steps: Vec<u8>,
    what: Vec<String>,
    data: Vec<(u64, Vec<u8>)>,
    next: u64,
    devices: usize,
}

impl Script {
    /// A script for a VM whose first `devices` virtio devices the guest takes interrupts
    /// from.
    pub fn new(devices: usize) -> Script {
        assert!((1..=3).contains(&devices));
        Script {
            steps: Vec::new(),
            what: Vec::new(),
            data: Vec::new(),
            next: DATA,
            devices,
        }
    }

    // ---- guest memory -------------------------------------------------------------

    /// Reserve `len` zeroed bytes of guest memory aligned to `align`.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        self.next = at + len;
        assert!(self.next <= GUEST_MEMORY, "test data outruns guest memory");
        at
    }

    /// Put `bytes` in guest memory (before the guest starts); returns the address.
    pub fn place(&mut self, bytes: &[u8]) -> u64 {
        let at = self.alloc(bytes.len() as u64, 16);
        self.data.push((at, bytes.to_vec()));
        at
    }

    // ---- raw steps ----------------------------------------------------------------

    fn step(&mut self, code: u8, size: u8, flag: u8, [a, b, c]: [u64; 3], what: String) {
        let mut s = [0u8; 32];
        s[0] = code;
        s[1] = size;
        s[2] = flag;
        s[8..16].copy_from_slice(&a.to_le_bytes());
        s[16..24].copy_from_slice(&b.to_le_bytes());
        s[24..32].copy_from_slice(&c.to_le_bytes());
        self.steps.extend_from_slice(&s);
        self.what.push(what);
        assert!(
            SCRIPT + self.steps.len() as u64 <= SCRIPT_END,
            "script too long"
        );
    }

    /// Store `value` (`size` bytes: 1, 2, 4 or 8) at `addr` (memory or a register).
    pub fn write(&mut self, size: u8, addr: u64, value: u64, what: impl Into<String>) {
        check_size(size);
        self.step(op::WRITE, size, 0, [addr, value, 0], what.into());
    }

    /// Check that the `size`-byte value at `addr` equals `value`.
    pub fn expect(&mut self, size: u8, addr: u64, value: u64, what: impl Into<String>) {
        self.expect_masked(size, addr, u64::MAX, value, what);
    }

    /// Check that `value_at(addr) & mask == value`.
    pub fn expect_masked(
        &mut self,
        size: u8,
        addr: u64,
        mask: u64,
        value: u64,
        what: impl Into<String>,
    ) {
        check_size(size);
        self.step(op::EXPECT, size, 0, [addr, value, mask], what.into());
    }

    /// Check that `value_at(addr) & mask != value`.
    pub fn expect_not(&mut self, size: u8, addr: u64, mask: u64, value: u64, what: &str) {
        check_size(size);
        self.step(op::EXPECT, size, 1, [addr, value, mask], what.into());
    }

    /// Halt (interrupts enabled) until the value at `addr` is at least `value`.
    pub fn wait_at_least(&mut self, size: u8, addr: u64, value: u64, what: impl Into<String>) {
        check_size(size);
        self.step(op::WAIT, size, 1, [addr, value, u64::MAX], what.into());
    }

    /// Copy `len` bytes from `src` to `dst`, a byte at a time (so `src` may be config
    /// space).
    pub fn copy(&mut self, dst: u64, src: u64, len: u64, what: impl Into<String>) {
        self.step(op::COPY, 1, 0, [dst, src, len], what.into());
    }

    /// Check that `len` bytes at `a` and `b` are equal; a failure reports the offset.
    pub fn compare(&mut self, a: u64, b: u64, len: u64, what: impl Into<String>) {
        self.step(op::CMP, 1, 0, [a, b, len], what.into());
    }

    /// Compare guest memory at `addr` with `expected` (placed in guest memory for it).
    pub fn compare_with(&mut self, addr: u64, expected: &[u8], what: impl Into<String>) {
        let e = self.place(expected);
        self.compare(addr, e, expected.len() as u64, what);
    }

    /// Print `text` on the serial console.
    pub fn print(&mut self, text: &str) {
        let at = self.place(text.as_bytes());
        self.step(
            op::PUTS,
            1,
            0,
            [at, 0, text.len() as u64],
            format!("print {text:?}"),
        );
    }

    /// Print the `size`-byte value at `addr` in hex (2 * size digits).
    pub fn print_hex(&mut self, size: u8, addr: u64) {
        check_size(size);
        self.step(
            op::PUTHEX,
            size,
            0,
            [addr, 0, 0],
            format!("print {addr:#x}"),
        );
    }

    /// Power the VM off (the last step).
    pub fn end(&mut self) {
        self.step(op::END, 0, 0, [0, 0, 0], "power off".into());
    }

    // ---- virtio -------------------------------------------------------------------

    /// A queue of `size` entries for device `dev`, its rings in zeroed guest memory.
    pub fn virtq(&mut self, dev: Device, index: u16, size: u16) -> Virtq {
        assert!(size.is_power_of_two());
        let n = u64::from(size);
        let desc = self.alloc(16 * n, 4096);
        let avail = self.alloc(6 + 2 * n, 4096);
        let used = self.alloc(6 + 8 * n, 4096);
        Virtq {
            dev,
            index,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The driver side of device initialisation (virtio 1.x, 3.1.1), each step checked:
    /// identify the device, reset, ACKNOWLEDGE and DRIVER, check that the device offers
    /// every bit of `must_offer`, accept `accept`, FEATURES_OK (and check it stuck), set up
    /// `queues` (checking their maximum size is `queue_max`), DRIVER_OK and check that no
    /// failure bit came up.
    pub fn init_device(
        &mut self,
        dev: Device,
        device_id: u32,
        must_offer: u64,
        accept: u64,
        queue_max: u16,
        queues: &[&Virtq],
    ) {
        let d = format!("device {} (type {device_id})", dev.index);
        self.expect(4, dev.reg(reg::MAGIC), 0x7472_6976, format!("{d}: magic"));
        self.expect(4, dev.reg(reg::VERSION), 2, format!("{d}: version 2"));
        self.expect(
            4,
            dev.reg(reg::DEVICE_ID),
            device_id.into(),
            format!("{d}: id"),
        );
        self.write(4, dev.reg(reg::STATUS), 0, format!("{d}: reset"));
        self.expect(
            4,
            dev.reg(reg::STATUS),
            0,
            format!("{d}: status after reset"),
        );
        self.write(4, dev.reg(reg::STATUS), status::ACKNOWLEDGE.into(), "ACK");
        let s = status::ACKNOWLEDGE | status::DRIVER;
        self.write(4, dev.reg(reg::STATUS), s.into(), "DRIVER");
        for word in 0..2u64 {
            let shift = 32 * word;
            self.write(4, dev.reg(reg::DEVICE_FEATURES_SEL), word, "features sel");
            let must = (must_offer >> shift) & 0xffff_ffff;
            self.expect_masked(
                4,
                dev.reg(reg::DEVICE_FEATURES),
                must,
                must,
                format!("{d}: offered features word {word} lack some of {must:#x}"),
            );
            self.write(4, dev.reg(reg::DRIVER_FEATURES_SEL), word, "driver sel");
            let acc = (accept >> shift) & 0xffff_ffff;
            self.write(4, dev.reg(reg::DRIVER_FEATURES), acc, "accept");
        }
        let s = s | status::FEATURES_OK;
        self.write(4, dev.reg(reg::STATUS), s.into(), "FEATURES_OK");
        self.expect(
            4,
            dev.reg(reg::STATUS),
            s.into(),
            format!("{d}: FEATURES_OK accepted"),
        );
        for q in queues {
            assert_eq!(q.dev.index, dev.index);
            let qd = format!("{d} queue {}", q.index);
            self.write(4, dev.reg(reg::QUEUE_SEL), q.index.into(), "queue sel");
            self.expect(
                4,
                dev.reg(reg::QUEUE_READY),
                0,
                format!("{qd}: not ready yet"),
            );
            self.expect(
                4,
                dev.reg(reg::QUEUE_NUM_MAX),
                queue_max.into(),
                format!("{qd}: max size"),
            );
            self.write(4, dev.reg(reg::QUEUE_NUM), q.size.into(), "queue num");
            for (lo, hi, addr) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, q.desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, q.avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, q.used),
            ] {
                self.write(4, dev.reg(lo), addr & 0xffff_ffff, "ring address");
                self.write(4, dev.reg(hi), addr >> 32, "ring address");
            }
            self.write(4, dev.reg(reg::QUEUE_READY), 1, "queue ready");
            self.expect(4, dev.reg(reg::QUEUE_READY), 1, format!("{qd}: ready"));
        }
        let s = s | status::DRIVER_OK;
        self.write(4, dev.reg(reg::STATUS), s.into(), "DRIVER_OK");
        self.expect(
            4,
            dev.reg(reg::STATUS),
            s.into(),
            format!("{d}: running (no FAILED or NEEDS_RESET)"),
        );
    }

    /// Write a descriptor chain into the table and publish its head in the avail ring
    /// (no kick). Returns the head index.
    pub fn add_chain(&mut self, q: &mut Virtq, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty());
        // Slots are handed out round robin; tests keep fewer chains in flight than fit.
        let ids: Vec<u16> = (0..bufs.len())
            .map(|i| (q.next_desc + i as u16) % q.size)
            .collect();
        q.next_desc = (q.next_desc + bufs.len() as u16) % q.size;
        for (i, b) in bufs.iter().enumerate() {
            let (addr, len, mut flags) = match *b {
                Buf::R(a, l) => (a, l, 0),
                Buf::W(a, l) => (a, l, VIRTQ_DESC_F_WRITE),
            };
            let next = if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                u64::from(ids[i + 1])
            } else {
                0
            };
            let d = q.desc + 16 * u64::from(ids[i]);
            self.write(8, d, addr, "descriptor addr");
            let rest = u64::from(len) | (flags << 32) | (next << 48);
            self.write(8, d + 8, rest, "descriptor len/flags/next");
        }
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.write(2, slot, ids[0].into(), "avail ring entry");
        q.avail_idx = q.avail_idx.wrapping_add(1);
        // The entry is stored before the index (each store is followed by mfence).
        self.write(2, q.avail + 2, q.avail_idx.into(), "avail idx");
        ids[0]
    }

    /// Notify the device of new buffers on `q` (a write to QueueNotify: the ioeventfd).
    pub fn kick(&mut self, q: &Virtq) {
        self.write(
            4,
            q.dev.reg(reg::QUEUE_NOTIFY),
            q.index.into(),
            format!("notify queue {}", q.index),
        );
    }

    /// Add a chain, kick, wait for it to be used and check the used element.
    pub fn submit(&mut self, q: &mut Virtq, bufs: &[Buf], used_len: u32, what: &str) -> u16 {
        let head = self.add_chain(q, bufs);
        self.kick(q);
        self.wait_used(q, 1, what);
        self.expect_used(q, q.used_seen - 1, head, used_len, what);
        head
    }

    /// Halt until `n` more used entries are on `q` than the script waited for before.
    pub fn wait_used(&mut self, q: &mut Virtq, n: u16, what: &str) {
        q.used_seen = q.used_seen.wrapping_add(n);
        self.wait_at_least(
            2,
            q.used_idx_addr(),
            q.used_seen.into(),
            format!(
                "{what}: used ring of queue {} reaching {}",
                q.index, q.used_seen
            ),
        );
    }

    /// Check used element `n` of `q`: the chain `head`, `len` bytes written.
    pub fn expect_used(&mut self, q: &Virtq, n: u16, head: u16, len: u32, what: &str) {
        let e = q.used_elem(n);
        self.expect(4, e, head.into(), format!("{what}: used[{n}].id"));
        self.expect(4, e + 4, len.into(), format!("{what}: used[{n}].len"));
    }

    /// Check that the used index of `q` is exactly what the script waited for (nothing
    /// more was completed).
    pub fn expect_used_idx(&mut self, q: &Virtq, what: &str) {
        self.expect(
            2,
            q.used_idx_addr(),
            q.used_seen.into(),
            format!(
                "{what}: used idx of queue {} exactly {}",
                q.index, q.used_seen
            ),
        );
    }

    /// Check that the guest takes an interrupt from `dev` (halting until one comes: an
    /// interrupt raised while the guest had them masked is delivered here) and that one
    /// said "used ring updated".
    pub fn expect_interrupts(&mut self, dev: Device) {
        self.wait_at_least(
            8,
            dev.irq_count(),
            1,
            format!("device {}: an interrupt reaching the guest", dev.index),
        );
        self.expect_masked(
            8,
            dev.irq_status_seen(),
            1,
            1,
            format!(
                "device {}: an InterruptStatus with the used-ring bit",
                dev.index
            ),
        );
    }

    // ---- the program --------------------------------------------------------------

    /// Everything to load into the guest: the interpreter, handlers, IDT, the script and
    /// its data. Enter at [`CODE`] in long mode.
    pub fn segments(&self) -> Vec<(u64, Vec<u8>)> {
        let mut segs = vec![
            (CODE, interpreter(self.devices)),
            (SCRIPT, self.steps.clone()),
        ];
        let mut consts = b"0123456789abcdef".to_vec();
        consts.extend_from_slice(b"FAIL op= got=\n");
        consts.resize((END_VALUE - CONSTS) as usize, 0);
        consts.push(POWEROFF as u8);
        segs.push((CONSTS, consts));
        for i in 0..self.devices {
            segs.push((HANDLERS + 0x100 * i as u64, handler(Device::new(i))));
        }
        let (idt, idtr) = idt(self.devices);
        segs.push((IDT, idt));
        segs.push((IDTR, idtr));
        segs.extend(self.data.iter().cloned());
        segs
    }

    /// The program as an ELF64 kernel (one PT_LOAD per segment, entry [`CODE`]): what a
    /// VMM booting a kernel file (kiln's `__vmm` child) loads and enters in long mode.
    pub fn elf(&self) -> Vec<u8> {
        let segs = self.segments();
        let (ehsize, phsize) = (64usize, 56usize);
        let mut off = ehsize + phsize * segs.len();
        let mut out = vec![0u8; off];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // ELFCLASS64
        out[5] = 1; // little endian
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&CODE.to_le_bytes()); // e_entry
        out[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes()); // e_phoff
        out[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
        out[54..56].copy_from_slice(&(phsize as u16).to_le_bytes());
        out[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut body = Vec::new();
        for (i, (addr, bytes)) in segs.iter().enumerate() {
            let ph = &mut out[ehsize + i * phsize..ehsize + (i + 1) * phsize];
            ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
            ph[8..16].copy_from_slice(&(off as u64).to_le_bytes());
            ph[16..24].copy_from_slice(&addr.to_le_bytes()); // vaddr
            ph[24..32].copy_from_slice(&addr.to_le_bytes()); // paddr
            ph[32..40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            body.extend_from_slice(bytes);
            off += bytes.len();
        }
        out.extend_from_slice(&body);
        out
    }

    /// `Ok` when the console shows the script ran to its end without a failed check; the
    /// error names the failed step.
    pub fn verdict(&self, console: &str) -> Result<(), String> {
        if let Some(at) = console.find("FAIL op=") {
            let rest = &console[at + 8..];
            let op = rest
                .get(..4)
                .and_then(|h| usize::from_str_radix(h, 16).ok());
            let got = rest
                .get(9..25)
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            let what = op
                .and_then(|i| self.what.get(i))
                .map_or("?", String::as_str);
            let op = op.map_or("?".to_string(), |o| o.to_string());
            let got = got.map_or("?".to_string(), |v| format!("{v:#x}"));
            return Err(format!(
                "guest check failed at step {op} ({what}): got {got}; console: {console:?}"
            ));
        }
        Ok(())
    }
}

fn check_size(size: u8) {
    assert!(matches!(size, 1 | 2 | 4 | 8), "bad access size {size}");
}

/// The interpreter. Registers: r12 the current step, r13 its number, rdi/rbx/r8 its three
/// operands, ecx its size, r9d its flag.
fn interpreter(devices: usize) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    // The 8259 pair: vectors from 0x20, only the devices' IRQs (5, 6, 7) unmasked.
    let unmask = ((1u32 << devices) - 1) << FIRST_IRQ;
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xff & !unmask),
        (0xa1, 0xff),
    ] {
        a.mov(al, v).unwrap();
        a.out(port, al).unwrap();
    }
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(r12, SCRIPT).unwrap();
    a.xor(r13d, r13d).unwrap();

    let mut next = a.create_label();
    let mut advance = a.create_label();
    let mut fail = a.create_label();
    let mut load = a.create_label();
    let mut print_hex = a.create_label();
    let mut print_str = a.create_label();
    let mut op_write = a.create_label();
    let mut op_expect = a.create_label();
    let mut op_wait = a.create_label();
    let mut op_copy = a.create_label();
    let mut op_cmp = a.create_label();
    let mut op_puts = a.create_label();
    let mut op_puthex = a.create_label();
    let mut op_end = a.create_label();

    a.set_label(&mut next).unwrap();
    a.movzx(eax, byte_ptr(r12)).unwrap();
    a.movzx(ecx, byte_ptr(r12 + 1)).unwrap();
    a.movzx(r9d, byte_ptr(r12 + 2)).unwrap();
    a.mov(rdi, qword_ptr(r12 + 8)).unwrap();
    a.mov(rbx, qword_ptr(r12 + 16)).unwrap();
    a.mov(r8, qword_ptr(r12 + 24)).unwrap();
    for (code, label) in [
        (op::WRITE, op_write),
        (op::EXPECT, op_expect),
        (op::WAIT, op_wait),
        (op::COPY, op_copy),
        (op::CMP, op_cmp),
        (op::PUTS, op_puts),
        (op::PUTHEX, op_puthex),
        (op::END, op_end),
    ] {
        a.cmp(eax, code as i32).unwrap();
        a.je(label).unwrap();
    }
    a.mov(rax, u64::MAX).unwrap(); // unknown step
    a.jmp(fail).unwrap();

    a.set_label(&mut advance).unwrap();
    a.add(r12, 32).unwrap();
    a.inc(r13).unwrap();
    a.jmp(next).unwrap();

    // WRITE: [rdi] = rbx, then a full fence so stores reach the device in script order.
    a.set_label(&mut op_write).unwrap();
    let mut w2 = a.create_label();
    let mut w4 = a.create_label();
    let mut w8 = a.create_label();
    let mut wdone = a.create_label();
    a.cmp(ecx, 1).unwrap();
    a.jne(w2).unwrap();
    a.mov(byte_ptr(rdi), bl).unwrap();
    a.jmp(wdone).unwrap();
    a.set_label(&mut w2).unwrap();
    a.cmp(ecx, 2).unwrap();
    a.jne(w4).unwrap();
    a.mov(word_ptr(rdi), bx).unwrap();
    a.jmp(wdone).unwrap();
    a.set_label(&mut w4).unwrap();
    a.cmp(ecx, 4).unwrap();
    a.jne(w8).unwrap();
    a.mov(dword_ptr(rdi), ebx).unwrap();
    a.jmp(wdone).unwrap();
    a.set_label(&mut w8).unwrap();
    a.mov(qword_ptr(rdi), rbx).unwrap();
    a.set_label(&mut wdone).unwrap();
    a.mfence().unwrap();
    a.jmp(advance).unwrap();

    // load: rax = the ecx-byte value at [rdi], zero-extended.
    a.set_label(&mut load).unwrap();
    let mut l2 = a.create_label();
    let mut l4 = a.create_label();
    let mut l8 = a.create_label();
    a.cmp(ecx, 1).unwrap();
    a.jne(l2).unwrap();
    a.movzx(eax, byte_ptr(rdi)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut l2).unwrap();
    a.cmp(ecx, 2).unwrap();
    a.jne(l4).unwrap();
    a.movzx(eax, word_ptr(rdi)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut l4).unwrap();
    a.cmp(ecx, 4).unwrap();
    a.jne(l8).unwrap();
    a.mov(eax, dword_ptr(rdi)).unwrap();
    a.ret().unwrap();
    a.set_label(&mut l8).unwrap();
    a.mov(rax, qword_ptr(rdi)).unwrap();
    a.ret().unwrap();

    // EXPECT: (value & r8) == rbx (flag 0) or != rbx (flag 1); a failure reports the value.
    a.set_label(&mut op_expect).unwrap();
    let mut not_equal_mode = a.create_label();
    a.call(load).unwrap();
    a.mov(rdx, rax).unwrap();
    a.and(rax, r8).unwrap();
    a.test(r9d, r9d).unwrap();
    a.jnz(not_equal_mode).unwrap();
    a.cmp(rax, rbx).unwrap();
    a.je(advance).unwrap();
    a.mov(rax, rdx).unwrap();
    a.jmp(fail).unwrap();
    a.set_label(&mut not_equal_mode).unwrap();
    a.cmp(rax, rbx).unwrap();
    a.jne(advance).unwrap();
    a.mov(rax, rdx).unwrap();
    a.jmp(fail).unwrap();

    // WAIT: until (value & r8) >= rbx. Interrupts are enabled only in `sti; hlt`, which
    // cannot miss one that comes after the check: the device's interrupt is the only
    // thing that wakes the vCPU.
    a.set_label(&mut op_wait).unwrap();
    a.cli().unwrap();
    a.call(load).unwrap();
    a.and(rax, r8).unwrap();
    a.cmp(rax, rbx).unwrap();
    a.jae(advance).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.jmp(op_wait).unwrap();

    // COPY: r8 bytes from [rbx] to [rdi].
    a.set_label(&mut op_copy).unwrap();
    let mut copy_done = a.create_label();
    a.test(r8, r8).unwrap();
    a.jz(copy_done).unwrap();
    a.mov(al, byte_ptr(rbx)).unwrap();
    a.mov(byte_ptr(rdi), al).unwrap();
    a.inc(rbx).unwrap();
    a.inc(rdi).unwrap();
    a.dec(r8).unwrap();
    a.jmp(op_copy).unwrap();
    a.set_label(&mut copy_done).unwrap();
    a.mfence().unwrap();
    a.jmp(advance).unwrap();

    // CMP: r8 bytes at [rdi] and [rbx]; a failure reports the first differing offset.
    // One `repe cmpsb`: ring-0 code on PVM is emulated, and the emulator runs a string
    // instruction's iterations far faster than a loop of ordinary instructions.
    a.set_label(&mut op_cmp).unwrap();
    a.mov(rsi, rdi).unwrap();
    a.mov(rdi, rbx).unwrap();
    a.mov(rcx, r8).unwrap();
    a.test(rcx, rcx).unwrap();
    a.jz(advance).unwrap();
    a.cld().unwrap();
    a.repe().cmpsb().unwrap();
    a.je(advance).unwrap();
    a.mov(rax, r8).unwrap();
    a.sub(rax, rcx).unwrap();
    a.dec(rax).unwrap();
    a.jmp(fail).unwrap();

    // PUTS: r8 bytes at [rdi] to the serial port.
    a.set_label(&mut op_puts).unwrap();
    a.mov(rsi, rdi).unwrap();
    a.mov(rcx, r8).unwrap();
    a.call(print_str).unwrap();
    a.jmp(advance).unwrap();

    // PUTHEX: the ecx-byte value at [rdi], 2*ecx hex digits.
    a.set_label(&mut op_puthex).unwrap();
    a.call(load).unwrap();
    a.shl(ecx, 1).unwrap();
    a.call(print_hex).unwrap();
    a.jmp(advance).unwrap();

    // END and the end of a failure: the byte at END_VALUE to the ACPI power port (S5
    // unless the script changed it to the reset value).
    a.set_label(&mut op_end).unwrap();
    let mut halt = a.create_label();
    a.mov(rax, END_VALUE).unwrap();
    a.movzx(eax, byte_ptr(rax)).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.out(dx, al).unwrap();
    a.set_label(&mut halt).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.jmp(halt).unwrap();

    // fail: "FAIL op=NNNN got=<rax as 16 digits>\n", then power off.
    a.set_label(&mut fail).unwrap();
    a.mov(r14, rax).unwrap();
    a.mov(rsi, CONSTS + 16).unwrap();
    a.mov(ecx, 8).unwrap();
    a.call(print_str).unwrap();
    a.mov(rax, r13).unwrap();
    a.mov(ecx, 4).unwrap();
    a.call(print_hex).unwrap();
    a.mov(rsi, CONSTS + 24).unwrap();
    a.mov(ecx, 5).unwrap();
    a.call(print_str).unwrap();
    a.mov(rax, r14).unwrap();
    a.mov(ecx, 16).unwrap();
    a.call(print_hex).unwrap();
    a.mov(rsi, CONSTS + 29).unwrap();
    a.mov(ecx, 1).unwrap();
    a.call(print_str).unwrap();
    // A failed check always powers off.
    a.mov(rax, END_VALUE).unwrap();
    a.mov(byte_ptr(rax), POWEROFF).unwrap();
    a.jmp(op_end).unwrap();

    // print_str: rcx bytes at [rsi].
    a.set_label(&mut print_str).unwrap();
    let mut ps_loop = a.create_label();
    let mut ps_done = a.create_label();
    a.mov(dx, 0x3f8u32).unwrap();
    a.set_label(&mut ps_loop).unwrap();
    a.test(rcx, rcx).unwrap();
    a.jz(ps_done).unwrap();
    a.mov(al, byte_ptr(rsi)).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rsi).unwrap();
    a.dec(rcx).unwrap();
    a.jmp(ps_loop).unwrap();
    a.set_label(&mut ps_done).unwrap();
    a.ret().unwrap();

    // print_hex: the low ecx nibbles of rax, most significant first.
    a.set_label(&mut print_hex).unwrap();
    let mut ph_loop = a.create_label();
    a.mov(r10, rax).unwrap();
    a.mov(r11d, ecx).unwrap();
    a.mov(rsi, CONSTS).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.set_label(&mut ph_loop).unwrap();
    a.dec(r11d).unwrap();
    a.mov(ecx, r11d).unwrap();
    a.shl(ecx, 2).unwrap();
    a.mov(rax, r10).unwrap();
    a.shr(rax, cl).unwrap();
    a.and(eax, 0xf).unwrap();
    a.mov(al, byte_ptr(rsi + rax)).unwrap();
    a.out(dx, al).unwrap();
    a.test(r11d, r11d).unwrap();
    a.jnz(ph_loop).unwrap();
    a.ret().unwrap();

    a.assemble(CODE).unwrap()
}

/// Device `dev`'s interrupt handler: read and acknowledge InterruptStatus, count the
/// interrupt and remember the status bits, EOI the PIC.
fn handler(dev: Device) -> Vec<u8> {
    let mut h = CodeAssembler::new(64).unwrap();
    h.push(rax).unwrap();
    h.push(rcx).unwrap();
    h.mov(rcx, dev.base()).unwrap();
    h.mov(eax, dword_ptr(rcx + reg::INTERRUPT_STATUS as i32))
        .unwrap();
    h.mov(dword_ptr(rcx + 0x64), eax).unwrap();
    h.mov(rcx, dev.irq_count()).unwrap();
    h.inc(qword_ptr(rcx)).unwrap();
    h.or(qword_ptr(rcx + 8), rax).unwrap();
    h.mov(al, 0x20u32).unwrap();
    h.out(0x20, al).unwrap();
    h.pop(rcx).unwrap();
    h.pop(rax).unwrap();
    h.iretq().unwrap();
    h.assemble(HANDLERS + 0x100 * dev.index as u64).unwrap()
}

/// An IDT with a 64-bit interrupt gate for each device's vector, and its descriptor.
fn idt(devices: usize) -> (Vec<u8>, Vec<u8>) {
    let last = PIC_VECTOR_BASE + FIRST_IRQ + devices as u64 - 1;
    let mut idt = vec![0u8; 16 * (last as usize + 1)];
    for i in 0..devices {
        let vector = (PIC_VECTOR_BASE + FIRST_IRQ) as usize + i;
        let target = HANDLERS + 0x100 * i as u64;
        let g = &mut idt[16 * vector..16 * vector + 16];
        g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x08u16.to_le_bytes()); // kiln's 64-bit code segment
        g[5] = 0x8e; // present, DPL 0, interrupt gate
        g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    }
    let mut idtr = ((idt.len() - 1) as u16).to_le_bytes().to_vec();
    idtr.extend_from_slice(&IDT.to_le_bytes());
    (idt, idtr)
}
