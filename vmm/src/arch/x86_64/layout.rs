//! Where things live in a kiln guest's physical address space.
//!
//! Low memory follows the PC conventions a Linux kernel expects (real-mode IVT and BDA at 0,
//! EBDA below 640 KiB, ACPI tables in the BIOS area where the kernel scans for the RSDP).
//! Above RAM below 4 GiB a 1 GiB hole holds the MMIO devices, the IOAPIC and the LAPIC; RAM
//! that does not fit below the hole continues at 4 GiB.

/// The boot GDT (four 8-byte entries).
pub const GDT_ADDR: u64 = 0x500;
/// An empty boot IDT (the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The PVH memory map that `hvm_start_info.memmap_paddr` points to.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Most entries the PVH memory map may have before it would reach the zero page.
pub const PVH_MEMMAP_MAX: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
/// The Linux boot parameters ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// The single page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages: identity map of the low 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// How many bytes of guest-physical space the boot page tables identity-map.
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line kiln passes (the kernel's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables (RSDP first), inside the BIOS area the kernel scans.
pub const ACPI_ADDR: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where RAM above the legacy area starts; kernels load here.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device; each takes [`VIRTIO_MMIO_STRIDE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between virtio-mmio devices (one page, so each can be mapped alone).
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Size of one virtio-mmio register window (0x100 of registers plus config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// First GSI for virtio-mmio devices (4 is the serial port's, 1 the keyboard's).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI the IOAPIC offers.
pub const IRQ_MAX: u32 = 23;
/// The IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (needed on Intel for real-mode emulation).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (needed on Intel for real mode).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard controller's data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// kiln's ACPI power port: the FADT sleep-control/status and reset registers. Writing
/// `SLP_EN | SLP_TYP(5)` powers off; writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// The value the FADT tells the kernel to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0xfe;
/// S5 sleep type kiln's DSDT declares in `\_S5`.
pub const S5_SLEEP_TYPE: u8 = 5;
