//! Boot page tables: an identity map of the low 4 GiB with 2 MiB pages, enough for a
//! 64-bit kernel entry (kernel, boot parameters, command line, initrd) and for the MMIO
//! hole where the devices, IOAPIC and LAPIC live.

use super::layout::{IDENTITY_MAPPED, PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;

/// Number of page-directory pages (each maps 1 GiB).
pub const PD_PAGES: usize = (IDENTITY_MAPPED >> 30) as usize;

/// The page-table pages and where each goes in guest memory.
pub fn tables() -> Vec<(u64, [u64; 512])> {
    let mut out = Vec::with_capacity(2 + PD_PAGES);
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT | WRITABLE;
    out.push((PML4_ADDR, pml4));
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(PD_PAGES).enumerate() {
        *e = (PD_ADDR + 0x1000 * i as u64) | PRESENT | WRITABLE;
    }
    out.push((PDPT_ADDR, pdpt));
    for p in 0..PD_PAGES {
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            let phys = ((p as u64) << 30) + (i as u64) * TWO_MIB;
            *e = phys | PRESENT | WRITABLE | PAGE_SIZE_2M;
        }
        out.push((PD_ADDR + 0x1000 * p as u64, pd));
    }
    out
}

/// Walk `tables()` as the MMU would, for tests: the physical address of `virt`.
pub fn translate(tables: &[(u64, [u64; 512])], virt: u64) -> Option<u64> {
    let page = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
    let pml4e = page(PML4_ADDR)?[((virt >> 39) & 0x1ff) as usize];
    if pml4e & PRESENT == 0 {
        return None;
    }
    let pdpte = page(pml4e & !0xfff)?[((virt >> 30) & 0x1ff) as usize];
    if pdpte & PRESENT == 0 {
        return None;
    }
    let pde = page(pdpte & !0xfff)?[((virt >> 21) & 0x1ff) as usize];
    if pde & PRESENT == 0 || pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & !(TWO_MIB - 1) & 0x000f_ffff_ffff_f000) | (virt & (TWO_MIB - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_entries() {
        let t = tables();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0].0, 0x9000);
        assert_eq!(t[0].1[0], 0xa003);
        assert_eq!(t[1].1[0], 0xb003);
        assert_eq!(t[1].1[3], 0xe003);
        assert_eq!(t[1].1[4], 0);
        assert_eq!(t[2].1[0], 0x83);
        assert_eq!(t[2].1[1], 0x20_0083);
        assert_eq!(t[5].1[511], 0xffe0_0083);
    }

    #[test]
    fn identity_map_covers_low_4g_only() {
        let t = tables();
        for a in [
            0u64,
            0x7000,
            0x10_0000,
            0x1234_5678,
            0xd000_0060,
            0xfee0_00f0,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&t, a), Some(a), "{a:#x}");
        }
        assert_eq!(translate(&t, 1 << 32), None);
    }
}
