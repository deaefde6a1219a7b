//! kiln's own read-only view of qcow2 metadata: L1/L2 lookups and cluster decoding.
//!
//! Shared by `check`, `map`, `info` and the zstd-capable reader. Every table it loads was
//! first bounded by the file length (see [`Header::read`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::Mutex;

use super::header::{CompressionType, Header};

/// Bits 9..=55 of a standard L1/L2 entry hold the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO_FLAG: u64 = 1;

/// How one guest cluster is stored in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not in this layer: read from the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes (v3 zero flag), whatever the backing says.
    Zero,
    /// Plain data at a host offset.
    Data(u64),
    /// Compressed data: host byte offset and an upper bound of its length.
    Compressed { offset: u64, len: u64 },
}

/// Decode a compressed L2 entry into (host offset, byte length up to the last sector's end).
pub fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// Encode a compressed L2 entry for data at `offset` of `len` bytes.
pub fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let extra_sectors = (offset + len - 1) / 512 - offset / 512;
    COMPRESSED | (extra_sectors << x) | offset
}

/// Metadata of one qcow2 file.
pub struct Meta {
    pub file: File,
    pub file_len: u64,
    pub header: Header,
    pub l1: Vec<u64>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

/// Caches at most this many L2 tables (each at most 2 MiB).
const L2_CACHE_TABLES: usize = 64;

impl Meta {
    pub fn open(file: File) -> Result<Meta, String> {
        let file_len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
        let header = Header::read(&file, file_len)?;
        let l1 = read_table(&file, header.l1_table_offset, u64::from(header.l1_size))
            .map_err(|e| format!("reading L1 table: {e}"))?;
        Ok(Meta {
            file,
            file_len,
            header,
            l1,
            l2_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Load the L2 table at host offset `off` (checked, cached).
    pub fn l2_table(&self, off: u64) -> Result<Arc<Vec<u64>>, String> {
        let cs = self.header.cluster_size();
        if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(format!(
                "L2 table offset {off:#x} is unaligned or past the end of the file"
            ));
        }
        if off == 0 {
            return Err("L2 table at offset 0 overlaps the header".into());
        }
        let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&off) {
            return Ok(Arc::clone(t));
        }
        let t = Arc::new(
            read_table(&self.file, off, self.header.l2_entries())
                .map_err(|e| format!("reading L2 table at {off:#x}: {e}"))?,
        );
        if cache.len() >= L2_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(off, Arc::clone(&t));
        Ok(t)
    }

    /// How guest cluster `gc` is stored in this layer.
    pub fn lookup(&self, gc: u64) -> Result<Cluster, String> {
        let l2e = self.header.l2_entries();
        let l1_index = (gc / l2e) as usize;
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Ok(Cluster::Unallocated);
        };
        let l2_off = l1_entry & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Cluster::Unallocated);
        }
        let table = self.l2_table(l2_off)?;
        let entry = table[(gc % l2e) as usize];
        self.decode(entry)
    }

    /// Decode an L2 entry.
    pub fn decode(&self, entry: u64) -> Result<Cluster, String> {
        let bits = self.header.cluster_bits;
        if entry & COMPRESSED != 0 {
            let (offset, len) = compressed_range(entry, bits);
            if offset >= self.file_len {
                return Err(format!(
                    "compressed cluster at {offset:#x} lies past the end of the file"
                ));
            }
            return Ok(Cluster::Compressed { offset, len });
        }
        if self.header.version >= 3 && entry & ZERO_FLAG != 0 {
            return Ok(Cluster::Zero);
        }
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(Cluster::Unallocated);
        }
        let cs = self.header.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(format!(
                "data cluster offset {off:#x} is not cluster aligned"
            ));
        }
        // A data cluster may end past EOF only by a partial cluster (images whose last
        // cluster was never fully written); the reader zero-fills that tail.
        if off >= self.file_len {
            return Err(format!(
                "data cluster offset {off:#x} lies past the end of the file"
            ));
        }
        Ok(Cluster::Data(off))
    }

    /// Decompress one compressed cluster into `out` (one cluster long).
    pub fn read_compressed(&self, offset: u64, len: u64, out: &mut [u8]) -> Result<(), String> {
        let len = len.min(self.file_len - offset);
        let mut input = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut input, offset)
            .map_err(|e| format!("reading compressed cluster at {offset:#x}: {e}"))?;
        decompress(self.header.compression_type, &input, out)
            .map_err(|e| format!("compressed cluster at {offset:#x}: {e}"))
    }

    /// Read plain data from a host offset, zero-filling anything past the end of the file.
    pub fn read_data(&self, host: u64, out: &mut [u8]) -> Result<(), String> {
        let avail = self.file_len.saturating_sub(host).min(out.len() as u64) as usize;
        let (head, tail) = out.split_at_mut(avail);
        self.file
            .read_exact_at(head, host)
            .map_err(|e| format!("reading data at {host:#x}: {e}"))?;
        tail.fill(0);
        Ok(())
    }
}

/// Read `entries` big-endian u64s at `off`; the caller has bounded `entries` by the file.
pub fn read_table(file: &File, off: u64, entries: u64) -> std::io::Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    file.read_exact_at(&mut raw, off)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Decompress a qcow2 compressed cluster (input may carry trailing bytes past the stream).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("deflate: {e}"))?;
            if d.total_out() as usize != out.len() {
                return Err(format!(
                    "deflate stream gave {} bytes, expected {} ({status:?})",
                    d.total_out(),
                    out.len()
                ));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            // Clusters are at most 2 MiB: refuse frames that claim a bigger window rather
            // than allocate what the file says.
            dec.window_log_max(22).map_err(|e| format!("zstd: {e}"))?;
            dec.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}
