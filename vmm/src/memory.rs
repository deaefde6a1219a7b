//! Guest memory: anonymous host mappings laid out around the MMIO hole below 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest kiln accepts: room for the low area, boot structures and a kernel.
pub const MIN_MEM_SIZE: u64 = 16 << 20;
/// Largest guest kiln accepts (1 TiB).
pub const MAX_MEM_SIZE: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is outside {MIN_MEM_SIZE}..={MAX_MEM_SIZE}")]
    BadSize(u64),
    #[error("guest memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("mapping guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// The guest-physical RAM ranges for `size` bytes: below the hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut r = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        r.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    r
}

/// Map `size` bytes of guest RAM.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || size <= HIMEM_START {
        return Err(MemoryError::BadSize(size));
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size));
    }
    Ok(GuestMemoryMmap::from_ranges(&ram_ranges(size))?)
}

/// Parse a size such as `512M`, `2G`, `1048576`, `256MiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn ranges_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 1 << 30)]
        );
    }

    #[test]
    fn create_and_reject() {
        let m = create_guest_memory(32 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            create_guest_memory((32 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }
}
