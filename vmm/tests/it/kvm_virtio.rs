//! A tiny long-mode guest drives a virtio-mmio device end to end: it reads the transport's
//! registers, negotiates features, sets up a queue, publishes a buffer and notifies
//! (ioeventfd); the device fills the buffer on its worker thread and raises its interrupt
//! (irqfd, GSI 5, through the in-kernel PIC); the guest's interrupt handler reads and
//! acknowledges the interrupt status, and the guest prints what the device wrote.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::kvm_support::{kvm_or_skip, TIMEOUT};
use iced_x86::code_asm::*;
use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};
use kiln_vmm::transport::{
    read_config_bytes, ActivateContext, ActivateError, QueueHandler, QueueWorker, VirtioDevice,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

const DEVICE_ID: u32 = 0x2a;
const MMIO: u64 = 0xd000_0000;
const DESC: u64 = 0x40000;
const AVAIL: u64 = 0x41000;
const USED: u64 = 0x42000;
const BUF: u64 = 0x43000;
const IDT: u64 = 0x3000;
const IDTR: u64 = 0x3f00;
const FLAG: u64 = 0x5000;
const HANDLER: u64 = 0x10_1000;
const VECTOR: u64 = 0x25; // PIC base 0x20 + IRQ 5

struct Pong(Arc<AtomicUsize>);

impl QueueHandler for Pong {
    fn process_queue(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0;
            for d in chain {
                if d.is_write_only() && d.len() >= 4 {
                    mem.write_slice(b"pong", d.addr())
                        .expect("buffer in memory");
                    len = 4;
                    break;
                }
            }
            queue.add_used(mem, head, len).expect("add used");
            self.0.fetch_add(1, Ordering::SeqCst);
            used = true;
        }
        used
    }
}

struct PongDevice {
    served: Arc<AtomicUsize>,
    worker: Option<QueueWorker>,
}

impl VirtioDevice for PongDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(b"pong", offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker = Some(QueueWorker::spawn(
            "pong",
            Pong(self.served.clone()),
            ctx.mem,
            ctx.queues,
            ctx.interrupt,
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

fn out_char(a: &mut CodeAssembler, c: u8) {
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, c as u32).unwrap();
    a.out(dx, al).unwrap();
}

fn mmio_write(a: &mut CodeAssembler, off: i32, v: i32) {
    a.mov(dword_ptr(rbx + off), v).unwrap();
}

fn guest() -> Vec<(u64, Vec<u8>)> {
    let mut a = CodeAssembler::new(64).unwrap();
    // Interrupts: the 8259 pair with IRQ 5 alone unmasked, vectors from 0x20.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xdf),
        (0xa1, 0xff),
    ] {
        a.mov(al, v as u32).unwrap();
        a.out(port, al).unwrap();
    }
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();

    a.mov(rbx, MMIO).unwrap();
    // 'V' when magic, version and device ID are right.
    let mut bad = a.create_label();
    a.cmp(dword_ptr(rbx), 0x7472_6976).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(rbx + 4), 2).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(rbx + 8), DEVICE_ID as i32).unwrap();
    a.jne(bad).unwrap();
    out_char(&mut a, b'V');
    // ACKNOWLEDGE, DRIVER, accept VERSION_1 (bit 32), FEATURES_OK; 'F' if it sticks.
    mmio_write(&mut a, 0x70, 1);
    mmio_write(&mut a, 0x70, 3);
    mmio_write(&mut a, 0x24, 1);
    mmio_write(&mut a, 0x20, 1);
    mmio_write(&mut a, 0x70, 0xb);
    a.test(dword_ptr(rbx + 0x70), 8).unwrap();
    a.jz(bad).unwrap();
    out_char(&mut a, b'F');
    // Queue 0: 16 entries at DESC/AVAIL/USED, ready; then DRIVER_OK.
    mmio_write(&mut a, 0x30, 0);
    a.cmp(dword_ptr(rbx + 0x34), 16).unwrap();
    a.jne(bad).unwrap();
    mmio_write(&mut a, 0x38, 16);
    mmio_write(&mut a, 0x80, DESC as i32);
    mmio_write(&mut a, 0x84, 0);
    mmio_write(&mut a, 0x90, AVAIL as i32);
    mmio_write(&mut a, 0x94, 0);
    mmio_write(&mut a, 0xa0, USED as i32);
    mmio_write(&mut a, 0xa4, 0);
    mmio_write(&mut a, 0x44, 1);
    mmio_write(&mut a, 0x70, 0xf);
    // Descriptor 0: BUF, 16 bytes, device-writable. Publish it in the avail ring.
    a.mov(rax, DESC).unwrap();
    a.mov(rcx, BUF).unwrap();
    a.mov(qword_ptr(rax), rcx).unwrap();
    a.mov(dword_ptr(rax + 8), 16).unwrap();
    a.mov(word_ptr(rax + 12), 2).unwrap();
    a.mov(word_ptr(rax + 14), 0).unwrap();
    a.mov(rax, AVAIL).unwrap();
    a.mov(word_ptr(rax + 4), 0).unwrap();
    a.mfence().unwrap();
    a.mov(word_ptr(rax + 2), 1).unwrap();
    a.mfence().unwrap();
    // Notify queue 0: the write lands on the ioeventfd.
    mmio_write(&mut a, 0x50, 0);
    // Wait for the interrupt handler to set the flag (sti; hlt cannot miss it).
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.cli().unwrap();
    a.mov(rax, FLAG).unwrap();
    a.cmp(byte_ptr(rax), 1).unwrap();
    a.je(done).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.jmp(wait).unwrap();
    a.set_label(&mut done).unwrap();
    // The used ring must say one buffer of 4 bytes; then print the buffer.
    a.mov(rax, USED).unwrap();
    a.cmp(word_ptr(rax + 2), 1).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(rax + 8), 4).unwrap();
    a.jne(bad).unwrap();
    a.mov(rsi, BUF).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    for i in 0..4 {
        a.mov(al, byte_ptr(rsi + i)).unwrap();
        a.out(dx, al).unwrap();
    }
    out_char(&mut a, b'\n');
    let mut off = a.create_label();
    a.jmp(off).unwrap();
    a.set_label(&mut bad).unwrap();
    out_char(&mut a, b'!');
    a.set_label(&mut off).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0x34u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let main = a.assemble(0x10_0000).unwrap();

    // The handler: read and acknowledge the interrupt status, print 'I' if it says "used
    // ring", set the flag, EOI the PIC.
    let mut h = CodeAssembler::new(64).unwrap();
    h.push(rax).unwrap();
    h.push(rdx).unwrap();
    h.push(rcx).unwrap();
    h.mov(rcx, MMIO).unwrap();
    h.mov(eax, dword_ptr(rcx + 0x60)).unwrap();
    h.mov(dword_ptr(rcx + 0x64), eax).unwrap();
    h.add(al, b'H' as i32).unwrap(); // status 1 -> 'I'
    h.mov(dx, 0x3f8u32).unwrap();
    h.out(dx, al).unwrap();
    h.mov(rax, FLAG).unwrap();
    h.mov(byte_ptr(rax), 1).unwrap();
    h.mov(al, 0x20u32).unwrap();
    h.out(0x20, al).unwrap();
    h.pop(rcx).unwrap();
    h.pop(rdx).unwrap();
    h.pop(rax).unwrap();
    h.iretq().unwrap();
    let handler = h.assemble(HANDLER).unwrap();

    // The IDT: one 64-bit interrupt gate at VECTOR.
    let mut idt = vec![0u8; 16 * (VECTOR as usize + 1)];
    let g = &mut idt[16 * VECTOR as usize..];
    g[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
    let mut idtr = ((idt.len() - 1) as u16).to_le_bytes().to_vec();
    idtr.extend_from_slice(&IDT.to_le_bytes());
    vec![
        (0x10_0000, main),
        (HANDLER, handler),
        (IDT, idt),
        (IDTR, idtr),
    ]
}

#[test]
fn guest_drives_virtio_mmio_with_ioeventfd_and_irqfd() {
    if !kvm_or_skip("guest_drives_virtio_mmio_with_ioeventfd_and_irqfd") {
        return;
    }
    let served = Arc::new(AtomicUsize::new(0));
    let config = VmConfig::builder()
        .memory(64 << 20)
        .program(
            guest(),
            BootMode::Long {
                rip: 0x10_0000,
                rsi: 0,
            },
        )
        .device(Box::new(PongDevice {
            served: served.clone(),
            worker: None,
        }))
        .capture_console(true)
        .build()
        .unwrap();
    let mut m = Machine::start(config).unwrap();
    let reason = m.wait_timeout(TIMEOUT);
    let console = String::from_utf8_lossy(&m.console_output()).to_string();
    assert_eq!(reason, Some(ExitReason::Poweroff), "console: {console:?}");
    assert_eq!(console, "VFIpong\n");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    let t = m.transports()[0].lock().unwrap();
    assert!(t.is_activated());
    assert_eq!(
        t.interrupt().status(),
        0,
        "the guest acknowledged the interrupt"
    );
}
