//! Initial vCPU register state for each way kiln starts a guest.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};

use super::gdt;
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// 16-bit real mode at `cs:ip` (cs base = cs << 4), as after reset but without firmware.
    Real { cs: u16, ip: u16 },
    /// 32-bit protected mode, paging off, flat segments: the PVH entry (`ebx` = start info).
    Protected { eip: u32, ebx: u32 },
    /// 64-bit long mode on kiln's identity-mapped page tables: the Linux 64-bit boot
    /// protocol (`rsi` = boot parameters).
    Long { rip: u64, rsi: u64 },
}

/// General registers for `mode` on the boot vCPU.
pub fn boot_regs(mode: BootMode) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2, // bit 1 always reads as one
        ..Default::default()
    };
    match mode {
        BootMode::Real { ip, .. } => r.rip = u64::from(ip),
        BootMode::Protected { eip, ebx } => {
            r.rip = u64::from(eip);
            r.rbx = u64::from(ebx);
        }
        BootMode::Long { rip, rsi } => {
            r.rip = rip;
            r.rsi = rsi;
            r.rsp = BOOT_STACK_POINTER;
            r.rbp = BOOT_STACK_POINTER;
        }
    }
    r
}

/// Special registers for `mode`, starting from the vCPU's reset state `base`. The GDT and
/// page tables these refer to must be in guest memory (see `boot::write_boot_structures`).
pub fn boot_sregs(base: &kvm_sregs, mode: BootMode) -> kvm_sregs {
    let mut s = *base;
    match mode {
        BootMode::Real { cs, .. } => {
            s.cs.selector = cs;
            s.cs.base = u64::from(cs) << 4;
        }
        BootMode::Protected { .. } | BootMode::Long { .. } => {
            let long = matches!(mode, BootMode::Long { .. });
            let table = if long {
                gdt::GDT_LONG
            } else {
                gdt::GDT_PROTECTED
            };
            let code = gdt::segment(table[1], gdt::CODE_SELECTOR);
            let data = gdt::segment(table[2], gdt::DATA_SELECTOR);
            let tss = gdt::segment(table[3], gdt::TSS_SELECTOR);
            s.gdt.base = GDT_ADDR;
            s.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
            s.idt.base = IDT_ADDR;
            s.idt.limit = 7;
            s.cs = code;
            s.ds = data;
            s.es = data;
            s.fs = data;
            s.gs = data;
            s.ss = data;
            s.tr = tss;
            s.cr0 = (s.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            if long {
                s.cr3 = PML4_ADDR;
                s.cr4 |= CR4_PAE;
                s.cr0 |= CR0_PG;
                s.efer |= EFER_LME | EFER_LMA;
            } else {
                s.cr4 = 0;
                s.efer = 0;
            }
        }
    }
    s
}

/// FPU state of a freshly reset x87/SSE unit, as Linux expects at entry.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = byte as _;
    }
}

/// Put the local APIC in virtual-wire mode: LINT0 delivers the 8259's interrupts
/// (ExtINT) and LINT1 is NMI, as firmware leaves it. Without this the PIC (used by early
/// kernel code and by tiny guests) cannot interrupt the CPU.
pub fn set_lint(l: &mut kvm_lapic_state) {
    let lvt0 = get_reg(l, APIC_LVT0);
    set_reg(l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = get_reg(l, APIC_LVT1);
    set_reg(l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(&kvm_sregs::default(), BootMode::Long { rip: 0, rsi: 0 });
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l), (0x08, 1));
        assert_eq!((s.ss.selector, s.tr.selector), (0x10, 0x18));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
    }

    #[test]
    fn protected_and_real_sregs() {
        let s = boot_sregs(
            &kvm_sregs::default(),
            BootMode::Protected { eip: 0, ebx: 0 },
        );
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!((s.cs.db, s.cs.l, s.efer), (1, 0, 0));
        let r = boot_sregs(&kvm_sregs::default(), BootMode::Real { cs: 0x100, ip: 0 });
        assert_eq!((r.cs.selector, r.cs.base), (0x100, 0x1000));
        let g = boot_regs(BootMode::Long {
            rip: 0x100_0200,
            rsi: 0x7000,
        });
        assert_eq!(
            (g.rip, g.rsi, g.rsp, g.rflags),
            (0x100_0200, 0x7000, 0x8ff0, 2)
        );
    }

    #[test]
    fn lint_virtual_wire() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT0, 0x1_0000);
        set_lint(&mut l);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x1_0700);
        assert_eq!(get_reg(&l, APIC_LVT1), 0x400);
    }
}
