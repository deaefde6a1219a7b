//! MBR and GPT partition tables, read from the first sectors of a disk.
//!
//! Small enough to parse by hand: only the entries' start and length are needed, and every
//! field read is bounds-checked against the disk size so a corrupt table yields an error or an
//! empty list, never a panic.

/// One partition: byte offset and length on the disk, 1-based number as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("GPT header is corrupt: {0}")]
    BadGpt(&'static str),
}

const SECTOR: u64 = 512;
/// More than any real table holds; bounds the work done on a hostile header.
const MAX_GPT_ENTRIES: u32 = 1024;

/// Parses the partition table from the first sectors of a disk (`head` holds at least the
/// first 34 sectors when available) and the disk size. No table gives an empty list.
/// `read_at` fetches GPT entries beyond `head`.
pub fn parse(
    head: &[u8],
    disk_size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Result<Vec<Partition>, PartitionError> {
    if head.len() < 512 || head[510] != 0x55 || head[511] != 0xAA {
        return Ok(Vec::new());
    }
    let mbr = mbr_entries(head);
    // A protective MBR (type 0xEE) means the real table is the GPT.
    if mbr.iter().any(|(ty, _, _)| *ty == 0xEE) {
        return gpt(head, disk_size, read_at);
    }
    let mut out = Vec::new();
    for (i, (ty, lba, count)) in mbr.into_iter().enumerate() {
        // Extended partitions (0x05, 0x0F, 0x85) hold logical ones; not followed: boot
        // partitions of cloud images are primary.
        if ty == 0 || matches!(ty, 0x05 | 0x0F | 0x85) || count == 0 {
            continue;
        }
        let offset = u64::from(lba) * SECTOR;
        let len = u64::from(count) * SECTOR;
        if offset.checked_add(len).is_some_and(|end| end <= disk_size) {
            out.push(Partition {
                number: i as u32 + 1,
                offset,
                len,
            });
        }
    }
    Ok(out)
}

fn mbr_entries(head: &[u8]) -> Vec<(u8, u32, u32)> {
    (0..4)
        .map(|i| {
            let e = &head[446 + i * 16..446 + (i + 1) * 16];
            let ty = e[4];
            let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            let count = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
            (ty, lba, count)
        })
        .collect()
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn gpt(
    head: &[u8],
    disk_size: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Result<Vec<Partition>, PartitionError> {
    if head.len() < 1024 {
        return Err(PartitionError::BadGpt("disk too small"));
    }
    let h = &head[512..1024];
    if &h[..8] != b"EFI PART" {
        return Err(PartitionError::BadGpt("no EFI PART signature"));
    }
    let entries_lba = le64(h, 72);
    let count = le32(h, 80);
    let entry_size = le32(h, 84);
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return Err(PartitionError::BadGpt("entry size"));
    }
    if count > MAX_GPT_ENTRIES {
        return Err(PartitionError::BadGpt("too many entries"));
    }
    let table_len = u64::from(count) * u64::from(entry_size);
    let table_off = entries_lba
        .checked_mul(SECTOR)
        .ok_or(PartitionError::BadGpt("entry table offset"))?;
    if table_off
        .checked_add(table_len)
        .is_none_or(|end| end > disk_size)
    {
        return Err(PartitionError::BadGpt(
            "entry table past the end of the disk",
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    if !read_at(table_off, &mut table) {
        return Err(PartitionError::BadGpt("cannot read the entry table"));
    }
    let mut out = Vec::new();
    for i in 0..count as usize {
        let e = &table[i * entry_size as usize..(i + 1) * entry_size as usize];
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if last < first {
            continue;
        }
        let (Some(offset), Some(len)) = (
            first.checked_mul(SECTOR),
            (last - first + 1).checked_mul(SECTOR),
        ) else {
            continue;
        };
        if offset.checked_add(len).is_some_and(|end| end <= disk_size) {
            out.push(Partition {
                number: i as u32 + 1,
                offset,
                len,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn mbr_with(parts: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        for (i, (ty, lba, count)) in parts.iter().enumerate() {
            let e = &mut s[446 + i * 16..446 + (i + 1) * 16];
            e[4] = *ty;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    #[test]
    fn mbr_primary_partitions() {
        let head = mbr_with(&[(0x83, 2048, 4096), (0, 0, 0), (0x05, 9000, 10)]);
        let p = parse(&head, 10 << 20, &mut |_, _| false).unwrap();
        assert_eq!(
            p,
            vec![Partition {
                number: 1,
                offset: 2048 * 512,
                len: 4096 * 512
            }]
        );
        // A partition past the end of the disk is dropped.
        let p = parse(&head, 1 << 20, &mut |_, _| false).unwrap();
        assert!(p.is_empty());
        // No signature: no table.
        assert!(parse(&[0u8; 512], 1 << 20, &mut |_, _| false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn gpt_entries() {
        let mut disk = vec![0u8; 64 * 512];
        disk[..512].copy_from_slice(&mbr_with(&[(0xEE, 1, 63)]));
        let h = &mut disk[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&4u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        // Entry 2 (index 1): sectors 40..=59.
        let e = &mut disk[1024 + 128..1024 + 256];
        e[0] = 1;
        e[32..40].copy_from_slice(&40u64.to_le_bytes());
        e[40..48].copy_from_slice(&59u64.to_le_bytes());
        let size = disk.len() as u64;
        let d2 = disk.clone();
        let p = parse(&disk[..1024], size, &mut |off, buf| {
            let off = off as usize;
            buf.copy_from_slice(&d2[off..off + buf.len()]);
            true
        })
        .unwrap();
        assert_eq!(
            p,
            vec![Partition {
                number: 2,
                offset: 40 * 512,
                len: 20 * 512
            }]
        );
    }

    #[test]
    fn hostile_tables_do_not_panic() {
        // Pseudo-random headers: parse must return without panicking.
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..500 {
            let mut head = vec![0u8; 1024];
            for b in head.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            head[510] = 0x55;
            head[511] = 0xAA;
            if x.is_multiple_of(2) {
                head[446 + 4] = 0xEE;
                head[512..520].copy_from_slice(b"EFI PART");
            }
            let _ = parse(&head, x % (1 << 40), &mut |_, buf| {
                buf.fill(0xA5);
                true
            });
        }
    }
}
