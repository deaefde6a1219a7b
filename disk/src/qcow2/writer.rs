//! The streaming qcow2 writer: emits a fresh image front to back.
//!
//! imago writes images in place (allocate, then update tables); for convert and capture kiln
//! wants something else: clusters arrive in guest order, already compressed by worker
//! threads, and are appended to the file; the tables (L2, L1, refcounts) are computed in
//! memory and written once at the end, then the header. The file is only meaningful after
//! [`StreamWriter::finish`], which is why callers write to a temporary name and rename.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::{CompressionType, Header, INCOMPAT_COMPRESSION};
use super::meta::{compressed_entry, COPIED};

/// Refcounts are written 16 bits wide (refcount_order 4), as qemu-img does by default.
const REFCOUNT_ORDER: u32 = 4;

/// Builds one qcow2 file; guest clusters must be added in increasing order.
pub struct StreamWriter {
    file: File,
    /// Next free host byte offset (everything before it has been written).
    pos: u64,
    cluster_bits: u32,
    size: u64,
    compression: CompressionType,
    backing: Option<(String, String)>,
    /// (guest cluster, L2 entry), in increasing guest order.
    entries: Vec<(u64, u64)>,
    /// Refcount of every host cluster written so far.
    refcounts: Vec<u16>,
    next_guest: u64,
}

impl StreamWriter {
    /// Start an image of `size` bytes with clusters of 2^`cluster_bits` bytes.
    pub fn new(
        file: File,
        size: u64,
        cluster_bits: u32,
        compression: CompressionType,
    ) -> std::io::Result<StreamWriter> {
        let cs = 1u64 << cluster_bits;
        // Cluster 0 is the header, written by `finish`; until then the file is a hole there.
        // An empty file (the usual fresh temporary) is not truncated: on ext4 a truncate to
        // zero arms "flush on close" (auto_da_alloc), which would start writeback of the
        // whole image when the file is closed.
        if file.metadata()?.len() != 0 {
            file.set_len(0)?;
        }
        Ok(StreamWriter {
            file,
            pos: cs,
            cluster_bits,
            size,
            compression,
            backing: None,
            entries: Vec::new(),
            refcounts: vec![1],
            next_guest: 0,
        })
    }

    /// Record a backing file (name as it goes into the header, and its format).
    pub fn set_backing(&mut self, name: String, format: String) {
        self.backing = Some((name, format));
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs()
    }

    fn check_order(&mut self, gc: u64) -> std::io::Result<()> {
        if gc < self.next_guest || gc >= self.size.div_ceil(self.cs()) {
            return Err(std::io::Error::other(format!(
                "guest cluster {gc} out of order or range"
            )));
        }
        self.next_guest = gc + 1;
        Ok(())
    }

    /// Skip to the next cluster boundary (the gap stays a hole and reads as zeroes).
    fn pad_to_cluster(&mut self) {
        self.pos = self.pos.next_multiple_of(self.cs());
    }

    fn add_ref(&mut self, from: u64, to_excl: u64) {
        let first = from >> self.cluster_bits;
        let last = (to_excl - 1) >> self.cluster_bits;
        if self.refcounts.len() <= last as usize {
            self.refcounts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.refcounts[c as usize] += 1;
        }
    }

    /// Reserve the host cluster for plain guest cluster `gc` and return its offset; the
    /// caller writes the data there (possibly from another thread).
    pub fn place_plain(&mut self, gc: u64) -> std::io::Result<u64> {
        self.check_order(gc)?;
        self.pad_to_cluster();
        let cs = self.cs();
        let host = self.pos;
        self.pos += cs;
        self.add_ref(host, host + cs);
        self.entries.push((gc, host | COPIED));
        Ok(host)
    }

    /// Reserve `len` bytes for compressed guest cluster `gc` and return their offset.
    pub fn place_compressed(&mut self, gc: u64, len: u64) -> std::io::Result<u64> {
        self.check_order(gc)?;
        let cs = self.cs();
        if len == 0 || len >= cs {
            return Err(std::io::Error::other(
                "compressed cluster must be 1..cluster_size bytes",
            ));
        }
        // Keep 16-bit refcounts from overflowing when tiny streams pile into one cluster.
        let cur = (self.pos >> self.cluster_bits) as usize;
        if self.refcounts.get(cur).is_some_and(|&r| r >= u16::MAX - 1) {
            self.pad_to_cluster();
        }
        let host = self.pos;
        self.pos += len;
        // The entry covers whole 512-byte sectors; count references the way qemu-img check
        // does, up to the end of the last sector.
        self.add_ref(host, (host + len).next_multiple_of(512));
        self.entries
            .push((gc, compressed_entry(host, len, self.cluster_bits)));
        Ok(host)
    }

    /// Write one plain cluster (a short last cluster is zero-padded by the hole after it).
    pub fn write_cluster(&mut self, gc: u64, data: &[u8]) -> std::io::Result<()> {
        let host = self.place_plain(gc)?;
        self.file.write_all_at(data, host)
    }

    /// Write one compressed cluster (`data` is the compressed stream, shorter than a cluster).
    pub fn write_compressed(&mut self, gc: u64, data: &[u8]) -> std::io::Result<()> {
        let host = self.place_compressed(gc, data.len() as u64)?;
        self.file.write_all_at(data, host)
    }

    fn append_table(&mut self, words: &[u64]) -> std::io::Result<u64> {
        self.pad_to_cluster();
        let at = self.pos;
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in words {
            bytes.extend_from_slice(&w.to_be_bytes());
        }
        let len = (bytes.len() as u64)
            .next_multiple_of(self.cs())
            .max(self.cs());
        bytes.resize(len as usize, 0);
        self.file.write_all_at(&bytes, at)?;
        self.pos += len;
        self.add_ref(at, at + len);
        Ok(at)
    }

    /// Write the tables and the header; returns the finished file (not yet synced).
    pub fn finish(mut self) -> std::io::Result<File> {
        let cs = self.cs();
        let l2_entries = cs / 8;
        let guest_clusters = self.size.div_ceil(cs);
        let l1_size = guest_clusters.div_ceil(l2_entries);
        let mut l1 = vec![0u64; l1_size as usize];

        // L2 tables, one per populated L1 slot.
        let entries = std::mem::take(&mut self.entries);
        let mut i = 0;
        while i < entries.len() {
            let l1_index = entries[i].0 / l2_entries;
            let mut table = vec![0u64; l2_entries as usize];
            while i < entries.len() && entries[i].0 / l2_entries == l1_index {
                table[(entries[i].0 % l2_entries) as usize] = entries[i].1;
                i += 1;
            }
            let at = self.append_table(&table)?;
            l1[l1_index as usize] = at | COPIED;
        }
        let l1_offset = if l1_size > 0 {
            self.append_table(&l1)?
        } else {
            0
        };

        // Refcount structures must count themselves: find a fixed point.
        self.pad_to_cluster();
        let used = self.pos / cs;
        let rb_entries = (cs * 8) >> REFCOUNT_ORDER;
        let (mut rbs, mut rt_clusters) = (1u64, 1u64);
        loop {
            let total = used + rbs + rt_clusters;
            let need_rbs = total.div_ceil(rb_entries);
            let need_rt = (need_rbs * 8).div_ceil(cs);
            if need_rbs <= rbs && need_rt <= rt_clusters {
                break;
            }
            rbs = rbs.max(need_rbs);
            rt_clusters = rt_clusters.max(need_rt);
        }
        let rb_start = self.pos;
        let rt_start = rb_start + rbs * cs;
        let end = rt_start + rt_clusters * cs;
        self.refcounts.resize((end / cs) as usize, 0);
        for c in used..end / cs {
            self.refcounts[c as usize] = 1;
        }
        let mut reftable = vec![0u64; (rt_clusters * cs / 8) as usize];
        for (b, chunk) in self.refcounts.chunks(rb_entries as usize).enumerate() {
            let mut block = vec![0u8; cs as usize];
            for (j, r) in chunk.iter().enumerate() {
                block[j * 2..j * 2 + 2].copy_from_slice(&r.to_be_bytes());
            }
            reftable[b] = rb_start + b as u64 * cs;
            self.file.write_all_at(&block, rb_start + b as u64 * cs)?;
        }
        // Refcount blocks past the last refcount (the fixed point may over-reserve) stay
        // holes: they read as zeroes.
        let mut rt_bytes = Vec::with_capacity((rt_clusters * cs) as usize);
        for e in &reftable {
            rt_bytes.extend_from_slice(&e.to_be_bytes());
        }
        self.file.write_all_at(&rt_bytes, rt_start)?;
        self.pos = end;
        self.file.set_len(end)?;

        let (backing_file, backing_format) = match self.backing.take() {
            Some((n, f)) => (Some(n), Some(f)),
            None => (None, None),
        };
        let header = Header {
            version: 3,
            cluster_bits: self.cluster_bits,
            size: self.size,
            crypt_method: 0,
            l1_size: u32::try_from(l1_size).map_err(std::io::Error::other)?,
            l1_table_offset: l1_offset,
            refcount_table_offset: rt_start,
            refcount_table_clusters: u32::try_from(rt_clusters).map_err(std::io::Error::other)?,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if self.compression == CompressionType::Zstd {
                INCOMPAT_COMPRESSION
            } else {
                0
            },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: 112,
            compression_type: self.compression,
            backing_file,
            backing_format,
        };
        let bytes = header.encode();
        if bytes.len() as u64 > cs {
            return Err(std::io::Error::other(
                "header does not fit in the first cluster",
            ));
        }
        self.file.write_all_at(&bytes, 0)?;
        Ok(self.file)
    }
}
