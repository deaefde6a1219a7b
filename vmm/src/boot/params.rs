//! The Linux boot parameters ("zero page") and the PVH start info, built as plain values so
//! they can be checked against the boot protocol (Documentation/arch/x86/boot.rst).

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_start_info};

use crate::arch::x86_64::e820::E820Entry;

/// "HdrS": the setup header magic.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot-sector signature the kernel checks in `boot_flag`.
pub const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader ID: kiln has no assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Default alignment for a relocatable kernel without one (16 MiB).
pub const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `loadflags`: the protected-mode kernel is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 0x01;
/// The PVH start info magic.
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// Everything the zero page says about this boot.
#[derive(Debug, Clone)]
pub struct BootParamsInput<'a> {
    /// The setup header read from a bzImage, or None for an ELF vmlinux.
    pub header: Option<setup_header>,
    pub cmdline_addr: u64,
    /// Command line length without the terminating NUL.
    pub cmdline_len: u32,
    /// (address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
    pub rsdp_addr: u64,
}

/// Build the zero page. At most 128 e820 entries fit; more are dropped (kiln makes four).
pub fn boot_params(input: &BootParamsInput<'_>) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = input.header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.boot_flag = BOOT_FLAG;
    p.hdr.header = HDRS_MAGIC;
    p.hdr.loadflags |= LOADED_HIGH;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    p.hdr.cmd_line_ptr = input.cmdline_addr as u32;
    p.ext_cmd_line_ptr = (input.cmdline_addr >> 32) as u32;
    p.hdr.cmdline_size = input.cmdline_len;
    if let Some((addr, size)) = input.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    p.acpi_rsdp_addr = input.rsdp_addr;
    let n = input.e820.len().min(p.e820_table.len());
    for (slot, e) in p.e820_table.iter_mut().zip(input.e820.iter().take(n)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = n as u8;
    p
}

/// The PVH start info and its memory map.
pub fn pvh_start_info(
    cmdline_addr: u64,
    rsdp_addr: u64,
    memmap_addr: u64,
    e820: &[E820Entry],
) -> (hvm_start_info, Vec<hvm_memmap_table_entry>) {
    let map: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    (info, map)
}

/// Where the initrd goes: the highest page-aligned address where it ends below `limit`
/// (the lower of the kernel's `initrd_addr_max` + 1 and the end of low RAM), not below
/// `floor` (the end of the kernel).
pub fn initrd_address(size: u64, limit: u64, floor: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= floor).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::e820::memory_map;

    #[test]
    fn zero_page_known_values() {
        let map = memory_map(512 << 20);
        let mut h = setup_header {
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        h.initrd_addr_max = 0x7fff_ffff;
        let p = boot_params(&BootParamsInput {
            header: Some(h),
            cmdline_addr: 0x20000,
            cmdline_len: 27,
            initrd: Some((0x1f00_0000, 0x12_3456)),
            e820: &map,
            rsdp_addr: 0xe0000,
        });
        // Copy packed fields out before comparing.
        let (flag, magic, ldr, lf) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.type_of_loader,
            p.hdr.loadflags,
        );
        assert_eq!((flag, magic, ldr, lf & 1), (0xaa55, 0x5372_6448, 0xff, 1));
        let (ptr, size, align) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.kernel_alignment,
        );
        assert_eq!((ptr, size, align), (0x20000, 27, 0x20_0000));
        let (ri, rs) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((ri, rs), (0x1f00_0000, 0x12_3456));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        let (a, s, t) = (e.addr, e.size, e.r#type);
        assert_eq!((a, s, t), (0x10_0000, 0x1ff0_0000, 1));

        // The zero page is exactly one page, with the header at 0x1f1 and e820 at 0x2d0.
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        // SAFETY: boot_params is plain old data.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts((&p as *const boot_params).cast::<u8>(), 4096) };
        assert_eq!(bytes[0x1e8], 3);
        assert_eq!(&bytes[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(&bytes[0x228..0x22c], &0x20000u32.to_le_bytes());
        assert_eq!(&bytes[0x070..0x078], &0xe0000u64.to_le_bytes());
        assert_eq!(
            &bytes[0x2d0 + 2 * 20..0x2d0 + 2 * 20 + 8],
            &0x10_0000u64.to_le_bytes()
        );
    }

    #[test]
    fn elf_kernel_gets_defaults() {
        let p = boot_params(&BootParamsInput {
            header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 0,
            initrd: None,
            e820: &[],
            rsdp_addr: 0,
        });
        let (align, ri) = (p.hdr.kernel_alignment, p.hdr.ramdisk_image);
        assert_eq!((align, ri), (0x0100_0000, 0));
    }

    #[test]
    fn pvh_info() {
        let map = memory_map(256 << 20);
        let (i, m) = pvh_start_info(0x20000, 0xe0000, 0x6040, &map);
        assert_eq!((i.magic, i.version, i.memmap_entries), (0x336e_c578, 1, 3));
        assert_eq!(
            (i.cmdline_paddr, i.rsdp_paddr, i.memmap_paddr),
            (0x20000, 0xe0000, 0x6040)
        );
        assert_eq!((m[1].addr, m[1].type_), (0x9fc00, 2));
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            initrd_address(0x1800, 0x1000_0000, 0x200_0000),
            Some(0x0fff_e000)
        );
        assert_eq!(initrd_address(0x1000_0000, 0x1000_0000, 0x200_0000), None);
        assert_eq!(initrd_address(u64::MAX, 0x1000, 0), None);
    }
}
