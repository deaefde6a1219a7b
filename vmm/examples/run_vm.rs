//! Embedding kiln's VMM: describe a VM, start it, wait for it.
//!
//! ```text
//! cargo run -p kiln-vmm --example run_vm                       # a built-in tiny guest
//! cargo run -p kiln-vmm --example run_vm -- KERNEL [INITRD] [CMDLINE]
//! ```
//! With no kernel it runs a 16-bit program that greets on the serial console and powers
//! off, which works on any KVM (PVM included). A kernel needs hardware KVM to get far.

use iced_x86::code_asm::*;
use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::machine::{Machine, VmConfig};

fn tiny_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).expect("16-bit assembler");
    a.mov(dx, 0x3f8u32).expect("asm");
    for b in b"hello from a kiln microVM\n" {
        a.mov(al, u32::from(*b)).expect("asm");
        a.out(dx, al).expect("asm");
    }
    // ACPI S5 through kiln's power port, as a kernel's `poweroff` does.
    a.mov(dx, 0x600u32).expect("asm");
    a.mov(al, 0x34u32).expect("asm");
    a.out(dx, al).expect("asm");
    a.hlt().expect("asm");
    a.assemble(0x1000).expect("assemble")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let builder = VmConfig::builder()
        .memory(256 << 20)
        .vcpus(1)
        .console_terminal(true);
    let config = match args.first() {
        Some(kernel) => {
            let mut b = builder.kernel(kernel).cmdline(
                args.get(2)
                    .cloned()
                    .unwrap_or_else(|| "console=ttyS0 reboot=k panic=-1".into()),
            );
            if let Some(initrd) = args.get(1) {
                b = b.initrd(initrd);
            }
            b.build()?
        }
        None => builder
            .program(
                vec![(0x1000, tiny_guest())],
                BootMode::Real { cs: 0, ip: 0x1000 },
            )
            .build()?,
    };
    let mut vm = Machine::start(config)?;
    let reason = vm.wait();
    eprintln!("VM ended: {reason}");
    Ok(())
}
