//! x86_64 guest setup: the memory layout, the boot GDT and page tables, CPUID, MSRs,
//! register state, the e820 map and the ACPI tables that describe a kiln VM to its kernel.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod msrs;
pub mod paging;
pub mod regs;
