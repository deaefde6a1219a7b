//! The qcow2 header, parsed and checked by kiln itself.
//!
//! imago parses headers too, but kiln needs its own view before handing a file to imago:
//! to follow backing chains (and refuse loops) without opening anything, to read images imago
//! refuses (zstd compression), to report `info`, and above all to reject metadata whose claims
//! (table sizes, offsets) do not fit the file, so no allocation is ever sized by an untrusted
//! number.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The four magic bytes at offset 0 of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Largest virtual size kiln accepts (qemu's own limit is the same order: 2^55 is far past any
/// disk a module holds and keeps every cluster computation inside u64).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 55;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types kiln understands.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    Deflate,
    Zstd,
}

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

/// What is wrong with a header; turned into [`crate::DiskError::Corrupt`] with the path.
pub type HeaderResult<T> = Result<T, String>;

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Refcount entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Number of guest clusters.
    pub fn guest_clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size())
    }

    /// L1 entries needed to map the whole virtual size.
    pub fn l1_needed(&self) -> u64 {
        self.guest_clusters().div_ceil(self.l2_entries())
    }

    /// Read and validate the header of `file` (whose length is `file_len`).
    pub fn read(file: &File, file_len: u64) -> HeaderResult<Header> {
        if file_len < 72 {
            return Err(format!(
                "file is {file_len} bytes, too short for a qcow2 header"
            ));
        }
        // The header and its extensions live in the first cluster, at most 2 MiB; read at
        // most 4 KiB first, then the rest of the first cluster only when extensions need it.
        let first = file_len.min(4096) as usize;
        let mut buf = vec![0u8; first];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| format!("reading header: {e}"))?;
        if buf[0..4] != MAGIC {
            return Err("not a qcow2 file (bad magic)".into());
        }
        let version = be32(&buf, 4);
        if version != 2 && version != 3 {
            return Err(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            ));
        }
        let cluster_bits = be32(&buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(format!(
                "cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&buf, 24),
            crypt_method: be32(&buf, 32),
            l1_size: be32(&buf, 36),
            l1_table_offset: be64(&buf, 40),
            refcount_table_offset: be64(&buf, 48),
            refcount_table_clusters: be32(&buf, 56),
            nb_snapshots: be32(&buf, 60),
            snapshots_offset: be64(&buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err("file too short for a qcow2 v3 header".into());
            }
            h.incompatible_features = be64(&buf, 72);
            h.compatible_features = be64(&buf, 80);
            h.autoclear_features = be64(&buf, 88);
            h.refcount_order = be32(&buf, 96);
            h.header_length = be32(&buf, 100);
            if h.header_length < 104 || u64::from(h.header_length) > cluster_size {
                return Err(format!("header_length {} is invalid", h.header_length));
            }
            if h.header_length > 104 && buf.len() > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => return Err(format!("unknown compression type {t}")),
                };
            }
            let compression_bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if compression_bit != (h.compression_type == CompressionType::Zstd) {
                return Err("compression type field and incompatible feature bit disagree".into());
            }
        }
        if h.refcount_order > 6 {
            return Err(format!(
                "refcount_order {} is invalid (max 6)",
                h.refcount_order
            ));
        }
        if h.crypt_method != 0 {
            return Err("encrypted qcow2 images are not supported".into());
        }
        let unknown =
            h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION);
        if unknown & INCOMPAT_DATA_FILE != 0 {
            return Err("external data files are not supported".into());
        }
        if unknown & INCOMPAT_EXTL2 != 0 {
            return Err("extended L2 entries are not supported".into());
        }
        if unknown != 0 {
            return Err(format!("unknown incompatible features {unknown:#x}"));
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err("the image is marked corrupt".into());
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(format!(
                "virtual size {} exceeds the supported maximum {MAX_VIRTUAL_SIZE}",
                h.size
            ));
        }
        // Tables must be cluster aligned and lie inside the file; this is what lets every
        // later allocation be bounded by the real file length.
        let in_file = |what: &str, off: u64, len: u64| -> HeaderResult<()> {
            if !off.is_multiple_of(cluster_size) {
                return Err(format!("{what} offset {off:#x} is not cluster aligned"));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(format!(
                    "{what} at {off:#x} (+{len} bytes) lies past the end of the file ({file_len} bytes)"
                )),
            }
        };
        if u64::from(h.l1_size) < h.l1_needed() {
            return Err(format!(
                "L1 table has {} entries, the virtual size needs {}",
                h.l1_size,
                h.l1_needed()
            ));
        }
        if h.l1_size > 0 {
            in_file("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8)?;
        }
        if h.refcount_table_clusters == 0 {
            return Err("refcount table has zero clusters".into());
        }
        in_file(
            "refcount table",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cluster_size,
        )?;
        if h.nb_snapshots > 0 {
            // Each snapshot entry is at least 40 bytes.
            in_file(
                "snapshot table",
                h.snapshots_offset,
                u64::from(h.nb_snapshots) * 40,
            )?;
        }

        // Backing file name: inside the first cluster.
        let backing_off = be64(&buf, 8);
        let backing_len = be32(&buf, 16);
        let mut first_cluster: Option<Vec<u8>> = None;
        let mut read_first = |off: u64, len: u64| -> HeaderResult<Vec<u8>> {
            let end = off
                .checked_add(len)
                .filter(|&e| e <= cluster_size && e <= file_len)
                .ok_or_else(|| {
                    format!("header field at {off:#x}+{len} is outside the first cluster")
                })?;
            if first_cluster.is_none() {
                let n = cluster_size.min(file_len) as usize;
                let mut c = vec![0u8; n];
                file.read_exact_at(&mut c, 0)
                    .map_err(|e| format!("reading header: {e}"))?;
                first_cluster = Some(c);
            }
            let c = first_cluster
                .as_ref()
                .map(|c| &c[off as usize..end as usize]);
            Ok(c.unwrap_or_default().to_vec())
        };
        if backing_off != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(format!(
                    "backing file name length {backing_len} is invalid (1..=1023)"
                ));
            }
            let name = read_first(backing_off, u64::from(backing_len))?;
            h.backing_file = Some(
                String::from_utf8(name)
                    .map_err(|_| "backing file name is not UTF-8".to_string())?,
            );
        }
        if version == 3 {
            let mut off = u64::from(h.header_length).next_multiple_of(8);
            loop {
                let eh = read_first(off, 8)?;
                let typ = be32(&eh, 0);
                let len = u64::from(be32(&eh, 4));
                off += 8;
                if typ == EXT_END {
                    break;
                }
                let data = read_first(off, len)?;
                match typ {
                    EXT_BACKING_FORMAT => {
                        h.backing_format = Some(
                            String::from_utf8(data)
                                .map_err(|_| "backing format is not UTF-8".to_string())?,
                        )
                    }
                    EXT_DATA_FILE => return Err("external data files are not supported".into()),
                    _ => {}
                }
                off += len.next_multiple_of(8);
            }
        }
        Ok(h)
    }

    /// Encode a v3 header (112 bytes, with the compression type field) followed by the
    /// optional backing format extension and the end marker; the backing file name goes after.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 112];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
        b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
        b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
        b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b[104] = match self.compression_type {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        };
        if let Some(fmt) = &self.backing_format {
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            b.extend_from_slice(fmt.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        b
    }
}

/// Whether the first bytes of a file are the qcow2 magic.
pub fn is_qcow2(file: &File) -> std::io::Result<bool> {
    let mut m = [0u8; 4];
    match file.read_exact_at(&mut m, 0) {
        Ok(()) => Ok(m == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}
