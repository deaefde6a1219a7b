//! Tiny guest programs on real KVM, assembled here with iced-x86: real mode and long mode
//! set up by kiln's boot code, the serial port, i8042 reset, ACPI poweroff, a triple fault,
//! two vCPUs started by INIT/SIPI, and pause/stop.

use crate::kvm_support::{kvm_or_skip, run_program};
use iced_x86::code_asm::*;
use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};

/// `SLP_EN | SLP_TYP(5)`: what a kernel writes to the FADT's sleep control register for S5.
const POWEROFF: u32 = (1 << 5) | (5 << 2);

fn serial_out(a: &mut CodeAssembler, text: &str) {
    a.mov(dx, 0x3f8u32).unwrap();
    for b in text.bytes() {
        a.mov(al, b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
}

fn poweroff(a: &mut CodeAssembler) {
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, POWEROFF).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
}

#[test]
fn real_mode_writes_serial_and_powers_off() {
    if !kvm_or_skip("real_mode_writes_serial_and_powers_off") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    serial_out(&mut a, "real mode\n");
    poweroff(&mut a);
    let code = a.assemble(0x1000).unwrap();
    let out = run_program(vec![(0x1000, code)], BootMode::Real { cs: 0x100, ip: 0 }, 1);
    assert_eq!(out.console, "real mode\n");
    assert_eq!(out.reason, ExitReason::Poweroff);
}

#[test]
fn long_mode_on_kilns_page_tables() {
    if !kvm_or_skip("long_mode_on_kilns_page_tables") {
        return;
    }
    // 64-bit code at 1 MiB: it stores a 64-bit value far above the code through the
    // identity map, reads it back, and prints its top byte as a character, which works
    // only if long mode, paging and the flat data segments are what kiln set up.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x4c00_0000_0000_004du64).unwrap(); // 'L' in the top byte, 'M' in the low
    a.mov(rbx, 0x300_0000u64).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.mov(rcx, qword_ptr(rbx)).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(rax, rcx).unwrap();
    a.shr(rax, 56).unwrap();
    a.out(dx, al).unwrap();
    a.mov(rax, rcx).unwrap();
    a.out(dx, al).unwrap();
    // CR4.PAE and EFER.LMA are visible to the guest too: print "+" if CR0.PG is set.
    a.mov(rax, cr0).unwrap();
    a.shr(rax, 31).unwrap();
    a.add(al, b'*' as i32).unwrap(); // '*' + 1 == '+'
    a.out(dx, al).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    poweroff(&mut a);
    let code = a.assemble(0x10_0000).unwrap();
    let out = run_program(
        vec![(0x10_0000, code)],
        BootMode::Long {
            rip: 0x10_0000,
            rsi: 0,
        },
        1,
    );
    assert_eq!(out.console, "LM+\n");
    assert_eq!(out.reason, ExitReason::Poweroff);
}

#[test]
fn i8042_reset_ends_the_vm_with_reset() {
    if !kvm_or_skip("i8042_reset_ends_the_vm_with_reset") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    serial_out(&mut a, "rebooting\n");
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x1000).unwrap();
    let out = run_program(
        vec![(0x1000, code)],
        BootMode::Real { cs: 0, ip: 0x1000 },
        1,
    );
    assert_eq!(out.console, "rebooting\n");
    assert_eq!(out.reason, ExitReason::Reset);
}

#[test]
fn acpi_reset_register_resets() {
    if !kvm_or_skip("acpi_reset_register_resets") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0xfeu32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x1000).unwrap();
    let out = run_program(
        vec![(0x1000, code)],
        BootMode::Real { cs: 0, ip: 0x1000 },
        1,
    );
    assert_eq!(out.reason, ExitReason::Reset);
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_or_skip("triple_fault_is_reported") {
        return;
    }
    // kiln's boot IDT is empty (limit 7, all zero): any exception in long mode cannot be
    // delivered, which escalates to a double fault and then a triple fault.
    let mut a = CodeAssembler::new(64).unwrap();
    serial_out(&mut a, "faulting\n");
    a.ud2().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let out = run_program(
        vec![(0x10_0000, code)],
        BootMode::Long {
            rip: 0x10_0000,
            rsi: 0,
        },
        1,
    );
    assert_eq!(out.console, "faulting\n");
    assert_eq!(out.reason, ExitReason::TripleFault { vcpu: 0 });
}

#[test]
fn two_vcpus_start_by_init_sipi() {
    if !kvm_or_skip("two_vcpus_start_by_init_sipi") {
        return;
    }
    const FLAG: u64 = 0x5000;
    const AP_CODE: u64 = 0x2000; // SIPI vector 2: the AP starts at 0200:0000
                                 // The AP (vCPU 1) in real mode: report, set the flag, halt.
    let mut ap = CodeAssembler::new(16).unwrap();
    serial_out(&mut ap, "ap\n");
    ap.xor(ax, ax).unwrap();
    ap.mov(ds, ax).unwrap();
    ap.mov(byte_ptr(FLAG), 1).unwrap();
    ap.cli().unwrap();
    let mut halt = ap.create_label();
    ap.set_label(&mut halt).unwrap();
    ap.hlt().unwrap();
    ap.jmp(halt).unwrap();
    let ap_code = ap.assemble(AP_CODE).unwrap();

    // The BSP in long mode: enable its LAPIC, INIT then SIPI to APIC ID 1, wait for the
    // flag, report, power off.
    let mut a = CodeAssembler::new(64).unwrap();
    serial_out(&mut a, "bsp\n");
    a.mov(rbx, 0xfee0_0000u64).unwrap();
    a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // spurious vector, APIC enabled
    a.mov(dword_ptr(rbx + 0x310), 1 << 24).unwrap(); // destination APIC ID 1
    a.mov(dword_ptr(rbx + 0x300), 0x4500).unwrap(); // INIT, assert
    a.mov(dword_ptr(rbx + 0x310), 1 << 24).unwrap();
    a.mov(dword_ptr(rbx + 0x300), 0x4600 | (AP_CODE >> 12) as i32)
        .unwrap(); // SIPI
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.cmp(byte_ptr(FLAG), 1).unwrap();
    a.jne(wait).unwrap();
    serial_out(&mut a, "both\n");
    poweroff(&mut a);
    let bsp_code = a.assemble(0x10_0000).unwrap();
    let out = run_program(
        vec![(0x10_0000, bsp_code), (AP_CODE, ap_code)],
        BootMode::Long {
            rip: 0x10_0000,
            rsi: 0,
        },
        2,
    );
    assert_eq!(out.console, "bsp\nap\nboth\n");
    assert_eq!(out.reason, ExitReason::Poweroff);
}

#[test]
fn pause_resume_and_stop() {
    if !kvm_or_skip("pause_resume_and_stop") {
        return;
    }
    // A guest that writes to the serial port forever.
    let mut a = CodeAssembler::new(16).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'.' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(top).unwrap();
    let code = a.assemble(0x1000).unwrap();
    let config = VmConfig::builder()
        .memory(32 << 20)
        .program(vec![(0x1000, code)], BootMode::Real { cs: 0, ip: 0x1000 })
        .build()
        .unwrap();
    let mut m = Machine::start(config).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(m.exit_count() > 0, "the guest runs");
    m.pause();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let paused_at = m.exit_count();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(m.exit_count() <= paused_at + 1, "no progress while paused");
    m.resume();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(m.exit_count() > paused_at + 1, "progress after resume");
    assert_eq!(m.stop(), ExitReason::Stopped);
    assert_eq!(m.exit_reason(), Some(ExitReason::Stopped));
}
