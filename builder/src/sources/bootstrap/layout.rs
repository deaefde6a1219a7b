//! The bootstrapped disk's partition table: a GPT with a BIOS boot partition (GRUB's core
//! image), an EFI system partition and the ext4 root last, so the root can grow into whatever
//! the disk gains. Written by hand (a few hundred bytes with two CRCs): no loop device, no
//! sfdisk, and every GUID comes from the cache key, so the same inputs give the same table.

use sha2::{Digest, Sha256};

pub const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// GPT's usual 128 entries of 128 bytes: 32 sectors.
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
const ENTRY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / SECTOR;

/// Partition types (GPT type GUIDs).
pub const TYPE_BIOS_BOOT: Guid = Guid::parse_const("21686148-6449-6E6F-744E-656564454649");
pub const TYPE_ESP: Guid = Guid::parse_const("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
/// The Discoverable Partitions root type for x86-64, which `systemd-repart`'s `Type=root`
/// matches when it grows the root at first boot.
pub const TYPE_ROOT_X86_64: Guid = Guid::parse_const("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");

/// The BIOS boot partition: 1 MiB, far more than GRUB's core image needs.
pub const BIOS_BOOT: Extent = Extent {
    offset: MIB,
    len: MIB,
};
/// The EFI system partition: 64 MiB, enough for FAT32 and a standalone GRUB (~10 MiB).
pub const ESP: Extent = Extent {
    offset: 2 * MIB,
    len: 64 * MIB,
};
/// Where the root partition starts.
pub const ROOT_OFFSET: u64 = ESP.offset + ESP.len;
/// Left after the root for GPT's backup (33 sectors), rounded to keep the size aligned.
const TAIL: u64 = MIB;

/// A byte range on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn first_lba(&self) -> u64 {
        self.offset / SECTOR
    }
    pub fn last_lba(&self) -> u64 {
        (self.offset + self.len) / SECTOR - 1
    }
}

/// A GUID, held in its textual (big-endian) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` at compile time (constants only: a bad
    /// literal fails the build).
    const fn parse_const(s: &str) -> Guid {
        let b = s.as_bytes();
        let mut out = [0u8; 16];
        let mut i = 0;
        let mut n = 0;
        while i < b.len() {
            if b[i] != b'-' {
                let hi = hex_digit(b[i]);
                let lo = hex_digit(b[i + 1]);
                out[n] = (hi << 4) | lo;
                n += 1;
                i += 1;
            }
            i += 1;
        }
        assert!(n == 16, "a GUID has 16 bytes");
        Guid(out)
    }

    /// A version-4-shaped GUID derived from `seed` and `what`: stable for the same inputs,
    /// different for each thing named.
    pub fn derive(seed: &str, what: &str) -> Guid {
        let d = Sha256::digest(format!("kiln-bootstrap-guid\0{seed}\0{what}").as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// GPT's on-disk order: the first three fields little-endian.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        let mut o = b;
        o[..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        o[4..6].copy_from_slice(&[b[5], b[4]]);
        o[6..8].copy_from_slice(&[b[7], b[6]]);
        o
    }
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, x) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// One partition of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub type_guid: Guid,
    pub guid: Guid,
    pub extent: Extent,
    pub name: &'static str,
}

/// The whole disk: size, partitions in table order, the disk GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub disk_guid: Guid,
    pub parts: Vec<Part>,
}

/// The GUIDs and UUIDs one bootstrap entry uses, all derived from its cache key.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub disk: Guid,
    pub bios_boot: Guid,
    pub esp: Guid,
    pub root_part: Guid,
    /// The root file system's UUID (`mkfs.ext4 -U`), which `root=UUID=` and fstab name.
    pub root_fs: Guid,
    /// ext4's directory hash seed (`mkfs.ext4 -E hash_seed=`), else random per build.
    pub root_hash_seed: Guid,
    /// The ESP's FAT volume id (`mkfs.vfat -i`).
    pub esp_volume_id: u32,
}

impl Ids {
    pub fn from_key(key: &str) -> Ids {
        let vol = Guid::derive(key, "esp-volume-id").0;
        Ids {
            disk: Guid::derive(key, "disk"),
            bios_boot: Guid::derive(key, "bios-boot"),
            esp: Guid::derive(key, "esp"),
            root_part: Guid::derive(key, "root-partition"),
            root_fs: Guid::derive(key, "root-fs"),
            root_hash_seed: Guid::derive(key, "root-hash-seed"),
            esp_volume_id: u32::from_be_bytes([vol[0], vol[1], vol[2], vol[3]]),
        }
    }
}

/// The smallest disk [`layout`] accepts: the boot partitions, 1 MiB of root, GPT's backup.
pub const MIN_DISK: u64 = ROOT_OFFSET + MIB + TAIL;

/// The layout of a disk of `disk_size` bytes (a multiple of 1 MiB, at least [`MIN_DISK`]):
/// the root takes all but the boot partitions and the backup table.
pub fn layout(disk_size: u64, ids: &Ids) -> Layout {
    let disk_size = disk_size.max(MIN_DISK) / MIB * MIB;
    let root = Extent {
        offset: ROOT_OFFSET,
        len: disk_size - ROOT_OFFSET - TAIL,
    };
    Layout {
        disk_size,
        disk_guid: ids.disk,
        parts: vec![
            Part {
                type_guid: TYPE_BIOS_BOOT,
                guid: ids.bios_boot,
                extent: BIOS_BOOT,
                name: "bios-boot",
            },
            Part {
                type_guid: TYPE_ESP,
                guid: ids.esp,
                extent: ESP,
                name: "esp",
            },
            Part {
                type_guid: TYPE_ROOT_X86_64,
                guid: ids.root_part,
                extent: root,
                name: "root",
            },
        ],
    }
}

/// The sectors of a GPT disk: the protective MBR, the primary header and entries (the
/// first 34 sectors, at offset 0) and the backup entries and header (the last 33 sectors,
/// at [`Gpt::backup_offset`]).
pub struct Gpt {
    pub primary: Vec<u8>,
    pub backup: Vec<u8>,
    pub backup_offset: u64,
}

impl Layout {
    pub fn gpt(&self) -> Gpt {
        let sectors = self.disk_size / SECTOR;
        let last_lba = sectors - 1;
        let backup_entries_lba = last_lba - ENTRY_SECTORS;

        let mut entries = vec![0u8; (ENTRY_SECTORS * SECTOR) as usize];
        for (i, p) in self.parts.iter().enumerate() {
            let e = &mut entries[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
            e[16..32].copy_from_slice(&p.guid.to_gpt_bytes());
            e[32..40].copy_from_slice(&p.extent.first_lba().to_le_bytes());
            e[40..48].copy_from_slice(&p.extent.last_lba().to_le_bytes());
            // Attributes 0; the name in UTF-16LE (36 units at most).
            for (j, u) in p.name.encode_utf16().take(36).enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let entries_crc = crc32(&entries);

        let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| -> Vec<u8> {
            let mut h = vec![0u8; SECTOR as usize];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my_lba.to_le_bytes());
            h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + ENTRY_SECTORS).to_le_bytes());
            h[48..56].copy_from_slice(&(backup_entries_lba - 1).to_le_bytes());
            h[56..72].copy_from_slice(&self.disk_guid.to_gpt_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
            h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };

        let mut primary = protective_mbr(sectors);
        primary.extend(header(1, last_lba, 2));
        primary.extend(&entries);
        let mut backup = entries;
        backup.extend(header(last_lba, 1, backup_entries_lba));
        Gpt {
            primary,
            backup,
            backup_offset: backup_entries_lba * SECTOR,
        }
    }

    /// The root partition: from [`ROOT_OFFSET`] to the room left for GPT's backup.
    pub fn root(&self) -> Extent {
        Extent {
            offset: ROOT_OFFSET,
            len: self.disk_size - ROOT_OFFSET - TAIL,
        }
    }
}

/// An MBR whose one partition (type 0xEE) covers the disk, so MBR-only tools leave it alone.
fn protective_mbr(sectors: u64) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    let e = &mut s[446..462];
    // CHS start 0/0/2, type 0xEE, CHS end at its maximum: the spec's values.
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    e[4] = 0xEE;
    e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    let count = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    e[12..16].copy_from_slice(&count.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootimage::partitions;

    fn sample() -> (Layout, Gpt) {
        let l = layout(1 << 30, &Ids::from_key("k"));
        let g = l.gpt();
        (l, g)
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guids_print_and_encode_like_gpt_tools() {
        assert_eq!(TYPE_ESP.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        // The ESP type as it sits on disk (the first three fields byte-swapped).
        assert_eq!(
            TYPE_ESP.to_gpt_bytes(),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        let a = Guid::derive("key1", "root-fs");
        assert_eq!(a, Guid::derive("key1", "root-fs"));
        assert_ne!(a, Guid::derive("key2", "root-fs"));
        assert_ne!(a, Guid::derive("key1", "disk"));
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "version 4: {s}");
    }

    #[test]
    fn layout_puts_root_last_and_leaves_room_for_the_backup() {
        let (l, _) = sample();
        assert_eq!(l.parts.len(), 3);
        let root = l.parts.last().unwrap();
        assert_eq!(root.type_guid, TYPE_ROOT_X86_64);
        assert_eq!(root.extent.offset, ROOT_OFFSET);
        assert_eq!(root.extent.len, (1 << 30) - ROOT_OFFSET - TAIL);
        assert_eq!(l.disk_size, 1 << 30);
        // Partitions are 1 MiB aligned, in order, none overlapping the GPT's own sectors.
        let mut end = 34 * SECTOR;
        for p in &l.parts {
            assert!(p.extent.offset >= end, "{p:?}");
            assert_eq!(p.extent.offset % MIB, 0);
            end = p.extent.offset + p.extent.len;
        }
        assert!(end + 33 * SECTOR <= l.disk_size);
        // Odd or tiny sizes are rounded to whole MiB and a usable minimum.
        assert_eq!(
            layout(MIN_DISK + 5, &Ids::from_key("k")).disk_size,
            MIN_DISK
        );
        assert_eq!(layout(0, &Ids::from_key("k")).root().len, MIB);
        assert_eq!(l.parts[1].extent, ESP);
        assert_eq!(l.root(), root.extent);
    }

    #[test]
    fn gpt_reads_back_with_the_boot_image_reader() {
        let (l, g) = sample();
        assert_eq!(g.primary.len(), 34 * 512);
        assert_eq!(g.backup.len(), 33 * 512);
        assert_eq!(g.backup_offset + g.backup.len() as u64, l.disk_size);
        let mut read = |off: u64, buf: &mut [u8]| {
            let off = off as usize;
            buf.copy_from_slice(&g.primary[off..off + buf.len()]);
            true
        };
        let got = partitions::parse(&g.primary, l.disk_size, &mut read).unwrap();
        let want: Vec<_> = l
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| partitions::Partition {
                number: i as u32 + 1,
                offset: p.extent.offset,
                len: p.extent.len,
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn gpt_headers_are_consistent_and_checksummed() {
        let (l, g) = sample();
        let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let last = l.disk_size / 512 - 1;
        let primary = &g.primary[512..1024];
        let backup = &g.backup[32 * 512..];
        for (h, my, alt) in [(primary, 1, last), (backup, last, 1)] {
            assert_eq!(&h[..8], b"EFI PART");
            assert_eq!(le64(h, 24), my);
            assert_eq!(le64(h, 32), alt);
            let mut z = h[..92].to_vec();
            z[16..20].fill(0);
            assert_eq!(le32(h, 16), crc32(&z), "header CRC");
            assert_eq!(le32(h, 88), crc32(&g.primary[1024..]), "entries CRC");
            assert_eq!(le64(h, 48), last - 33, "last usable LBA");
            assert_eq!(&h[56..72], &l.disk_guid.to_gpt_bytes());
        }
        assert_eq!(le64(backup, 72), last - 32);
        assert_eq!(&g.backup[..32 * 512], &g.primary[1024..]);
        // The protective MBR covers the disk and is signed.
        let mbr = &g.primary[..512];
        assert_eq!(mbr[450], 0xEE);
        assert_eq!(le32(mbr, 454), 1);
        assert_eq!(u64::from(le32(mbr, 458)), last);
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
        // The root's name, UTF-16LE, in the third entry.
        let e = &g.primary[1024 + 2 * 128..1024 + 3 * 128];
        assert_eq!(&e[56..64], &[b'r', 0, b'o', 0, b'o', 0, b't', 0]);
    }

    #[test]
    fn same_key_same_table() {
        let a = layout(1 << 30, &Ids::from_key("k")).gpt();
        let b = layout(1 << 30, &Ids::from_key("k")).gpt();
        assert_eq!(a.primary, b.primary);
        let c = layout(1 << 30, &Ids::from_key("other")).gpt();
        assert_ne!(a.primary, c.primary);
    }
}
