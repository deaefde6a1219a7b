//! Getting a guest to its first instruction: the boot GDT, IDT and page tables in guest
//! memory, and direct Linux kernel boot (see [`linux`]).

pub mod linux;
pub mod params;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::regs::BootMode;
use crate::arch::x86_64::{gdt, layout, paging};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("loading the kernel {path}: {detail}")]
    Kernel { path: String, detail: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error("the kernel needs boot protocol 2.06 or later (it has {0:#x})")]
    OldBootProtocol(u16),
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// Write what `mode` needs in guest memory: for protected and long mode the GDT and an
/// empty IDT; for long mode also the identity-mapping page tables. Real mode needs none.
pub fn write_boot_structures(mem: &GuestMemoryMmap, mode: BootMode) -> Result<(), BootError> {
    let table = match mode {
        BootMode::Real { .. } => return Ok(()),
        BootMode::Protected { .. } => gdt::GDT_PROTECTED,
        BootMode::Long { .. } => gdt::GDT_LONG,
    };
    mem.write_slice(&gdt::to_bytes(&table), GuestAddress(layout::GDT_ADDR))
        .map_err(mem_err("the GDT"))?;
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(mem_err("the IDT"))?;
    if let BootMode::Long { .. } = mode {
        for (addr, page) in paging::tables() {
            let bytes: Vec<u8> = page.iter().flat_map(|e| e.to_le_bytes()).collect();
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(mem_err("the page tables"))?;
        }
    }
    Ok(())
}
