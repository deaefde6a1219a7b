//! The e820 memory map kiln gives a guest: usable RAM below the EBDA, the legacy BIOS area
//! (which holds the ACPI tables) reserved, RAM from 1 MiB up to the MMIO hole, and any
//! remaining RAM above 4 GiB.

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map for a guest with `mem_size` bytes of RAM (at least 1 MiB + 1 byte).
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest() {
        let m = memory_map(256 << 20);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: 2
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 0xff0_0000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let m = memory_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[2],
            E820Entry {
                addr: 0x10_0000,
                size: 0xbff0_0000,
                kind: 1
            }
        );
        assert_eq!(
            m[3],
            E820Entry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: 1
            }
        );
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - 0x60400);
    }
}
