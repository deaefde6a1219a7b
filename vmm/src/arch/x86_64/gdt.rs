//! The boot GDT: flat code and data segments and a TSS descriptor, in the encoding the CPU
//! reads from guest memory and as the `kvm_segment` values loaded into the vCPU, which must
//! agree (a later segment reload by the guest reads the table).

use kvm_bindings::kvm_segment;

/// Selector of the code segment (entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS (entry 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// Encode one descriptor from its flags (type, S, DPL, P in bits 0..8; AVL, L, D/B, G in
/// bits 12..16), base and limit (in units of the granularity).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit code, present, ring 0, 4 KiB granularity.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit code (for the PVH entry, which starts in protected mode without paging).
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Read/write data, 32-bit, 4 KiB granularity.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// A 32-bit busy TSS.
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// The table for a 64-bit entry.
pub const GDT_LONG: [u64; 4] = [0, CODE64, DATA, TSS];
/// The table for a 32-bit (PVH) entry.
pub const GDT_PROTECTED: [u64; 4] = [0, CODE32, DATA, TSS];

/// The `kvm_segment` that loading `selector` from a table holding `entry` gives.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages, and the low 12 bits read as ones.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The table as little-endian bytes.
pub fn to_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // The values every Linux boot loader and VMM uses for flat segments.
        assert_eq!(CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(DATA, 0x00cf_9300_0000_ffff);
        assert_eq!(CODE32, 0x00cf_9b00_0000_ffff);
        assert_eq!(TSS, 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode() {
        let cs = segment(CODE64, CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        assert_eq!((cs.l, cs.db, cs.g, cs.s, cs.present), (1, 0, 1, 1, 1));
        let ds = segment(DATA, DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.l), (3, 1, 0));
        let tr = segment(TSS, TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.g), (0xb, 0, 1));
        assert_eq!(tr.limit, 0xffff_ffff);
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
