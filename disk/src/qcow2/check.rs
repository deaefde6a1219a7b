//! `check`: metadata consistency of one qcow2 file, in the spirit of `qemu-img check`.
//!
//! References are rebuilt from the tables (header, L1/L2 of the active state and of every
//! internal snapshot, refcount table and blocks, snapshot table) and compared with the stored
//! refcounts: a stored count below the references is corruption, above it is a leak. Every
//! offset is bounded by the real file length, so the work and memory are bounded by the file,
//! never by what its header claims.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use super::meta::{compressed_range, read_table, Meta, COMPRESSED, COPIED, OFFSET_MASK};
use crate::error::{corrupt, io_err, Result};

/// Keep at most this many messages (counts stay exact).
const MAX_MESSAGES: usize = 100;

/// The result of [`check`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Problems that can lose data (refcount too low, bad offsets, overlaps).
    pub corruptions: u64,
    /// Clusters with a refcount but no reference (space wasted, data safe).
    pub leaks: u64,
    /// Human-readable descriptions of the first problems.
    pub messages: Vec<String>,
    /// Clusters referenced by the active image.
    pub allocated_clusters: u64,
    /// Clusters the virtual size spans.
    pub total_clusters: u64,
    /// End of the last referenced cluster.
    pub image_end_offset: u64,
    /// Compressed clusters of the active image.
    pub compressed_clusters: u64,
    /// Active clusters not stored right after the previous one (compressed ones always
    /// count), as qemu-img counts them.
    pub fragmented_clusters: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(format!("ERROR {msg}"));
        }
    }

    fn leak(&mut self, msg: String) {
        self.leaks += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(format!("Leaked {msg}"));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    Meta,
    Data,
}

struct Walker<'a> {
    meta: &'a Meta,
    refs: Vec<u32>,
    kind: Vec<Kind>,
    report: CheckReport,
    cs: u64,
    /// Where the next active data cluster would be if stored contiguously (0: none yet).
    next_contiguous: u64,
}

impl Walker<'_> {
    /// Count one reference to every cluster in [off, off+len).
    fn inc(&mut self, off: u64, len: u64, kind: Kind, what: &str) -> bool {
        let n = self.refs.len() as u64;
        let first = off / self.cs;
        let last = (off + len.max(1) - 1) / self.cs;
        if last >= n {
            self.report.corrupt(format!(
                "{what} at {off:#x} (+{len}) lies past the end of the file"
            ));
            return false;
        }
        for c in first..=last {
            let i = c as usize;
            let prev = self.kind[i];
            if (prev == Kind::Meta && kind != Kind::Meta)
                || (prev == Kind::Data && kind == Kind::Meta)
            {
                self.report.corrupt(format!(
                    "{what} at {:#x} overlaps {} in the same cluster",
                    c * self.cs,
                    if prev == Kind::Meta {
                        "metadata"
                    } else {
                        "data"
                    }
                ));
            } else if prev == Kind::Meta
                && kind == Kind::Meta
                && self.refs[i] > 0
                && what != "L2 table"
            {
                self.report.corrupt(format!(
                    "{what} at {:#x} overlaps other metadata",
                    c * self.cs
                ));
            }
            if prev == Kind::Free {
                self.kind[i] = kind;
            }
            self.refs[i] = self.refs[i].saturating_add(1);
        }
        true
    }

    /// Walk one L1 table (active or snapshot); returns the host clusters its L2 entries use.
    fn walk_l1(
        &mut self,
        l1: &[u64],
        label: &str,
        active: bool,
        copied: &mut Vec<(u64, bool, String)>,
    ) {
        let bits = self.meta.header.cluster_bits;
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(self.cs) {
                self.report.corrupt(format!(
                    "{label} L1 entry {i}: L2 offset {l2_off:#x} is unaligned"
                ));
                continue;
            }
            if !self.inc(l2_off, self.cs, Kind::Meta, "L2 table") {
                continue;
            }
            if active {
                copied.push((l2_off, e & COPIED != 0, format!("L1 entry {i}")));
            }
            let table = match read_table(&self.meta.file, l2_off, self.meta.header.l2_entries()) {
                Ok(t) => t,
                Err(err) => {
                    self.report
                        .corrupt(format!("reading L2 table at {l2_off:#x}: {err}"));
                    continue;
                }
            };
            for (j, &le) in table.iter().enumerate() {
                let gc = i as u64 * self.meta.header.l2_entries() + j as u64;
                if le & COMPRESSED != 0 {
                    let (off, len) = compressed_range(le, bits);
                    self.inc(
                        off,
                        len,
                        Kind::Data,
                        &format!("{label} compressed cluster {gc}"),
                    );
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                    continue;
                }
                let off = le & OFFSET_MASK;
                // A zero cluster without a host cluster is not allocated (qemu-img does not
                // count it either).
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(self.cs) {
                    self.report.corrupt(format!(
                        "{label} guest cluster {gc}: data offset {off:#x} is unaligned"
                    ));
                    continue;
                }
                if gc >= self.meta.header.guest_clusters() {
                    self.report.corrupt(format!(
                        "{label} L2 entry for guest cluster {gc} beyond the virtual size"
                    ));
                }
                if self.inc(
                    off,
                    self.cs,
                    Kind::Data,
                    &format!("{label} data cluster {gc}"),
                ) && active
                {
                    self.report.allocated_clusters += 1;
                    if self.next_contiguous != 0 && off != self.next_contiguous {
                        self.report.fragmented_clusters += 1;
                    }
                    self.next_contiguous = off + self.cs;
                    copied.push((off, le & COPIED != 0, format!("guest cluster {gc}")));
                }
            }
        }
    }
}

/// Read stored refcount `index` of a refcount block (width 2^order bits).
fn refcount_at(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Check the qcow2 file at `path` (only this file, not its backing chain).
pub fn check(path: &Path) -> Result<CheckReport> {
    let file = File::open(path).map_err(io_err(path))?;
    let meta = Meta::open(file).map_err(corrupt(path))?;
    let h = meta.header.clone();
    let cs = h.cluster_size();
    let n = meta.file_len.div_ceil(cs) as usize;
    let mut w = Walker {
        meta: &meta,
        refs: vec![0; n],
        kind: vec![Kind::Free; n],
        report: CheckReport {
            total_clusters: h.guest_clusters(),
            ..Default::default()
        },
        cs,
        next_contiguous: 0,
    };

    w.inc(0, cs, Kind::Meta, "header");
    let mut copied = Vec::new();
    if h.l1_size > 0 {
        w.inc(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            Kind::Meta,
            "L1 table",
        );
    }
    w.walk_l1(&meta.l1, "active", true, &mut copied);

    // Internal snapshots.
    if h.nb_snapshots > 0 {
        let mut off = h.snapshots_offset;
        let start = off;
        for s in 0..h.nb_snapshots {
            let mut fixed = [0u8; 40];
            if off + 40 > meta.file_len || meta.file.read_exact_at(&mut fixed, off).is_err() {
                w.report.corrupt(format!(
                    "snapshot {s} header at {off:#x} lies past the end of the file"
                ));
                break;
            }
            let be64 = |a: usize| u64::from_be_bytes(fixed[a..a + 8].try_into().unwrap_or([0; 8]));
            let be32 = |a: usize| u32::from_be_bytes(fixed[a..a + 4].try_into().unwrap_or([0; 4]));
            let be16 = |a: usize| u16::from_be_bytes(fixed[a..a + 2].try_into().unwrap_or([0; 2]));
            let (l1_off, l1_size) = (be64(0), u64::from(be32(8)));
            let (id_len, name_len, extra) = (
                u64::from(be16(12)),
                u64::from(be16(14)),
                u64::from(be32(36)),
            );
            off += (40 + extra + id_len + name_len).next_multiple_of(8);
            let label = format!("snapshot {s}");
            if !l1_off.is_multiple_of(cs)
                || l1_off
                    .checked_add(l1_size * 8)
                    .is_none_or(|e| e > meta.file_len)
            {
                w.report.corrupt(format!("{label}: L1 table at {l1_off:#x} ({l1_size} entries) is unaligned or past the end"));
                continue;
            }
            if l1_size > 0 {
                w.inc(
                    l1_off,
                    l1_size * 8,
                    Kind::Meta,
                    &format!("{label} L1 table"),
                );
            }
            match read_table(&meta.file, l1_off, l1_size) {
                Ok(l1) => w.walk_l1(&l1, &label, false, &mut Vec::new()),
                Err(e) => w.report.corrupt(format!("{label}: reading L1 table: {e}")),
            }
        }
        w.inc(start, off - start, Kind::Meta, "snapshot table");
    }

    // Refcount structures.
    w.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        Kind::Meta,
        "refcount table",
    );
    let rt = read_table(
        &meta.file,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs / 8,
    )
    .map_err(io_err(path))?;
    let rb_entries = h.rb_entries();
    let mut stored = vec![0u64; n];
    let mut block = vec![0u8; cs as usize];
    for (i, &e) in rt.iter().enumerate() {
        let rb = e & OFFSET_MASK;
        if rb == 0 {
            continue;
        }
        if !rb.is_multiple_of(cs) {
            w.report
                .corrupt(format!("refcount block {i} at {rb:#x} is unaligned"));
            continue;
        }
        if !w.inc(rb, cs, Kind::Meta, &format!("refcount block {i}")) {
            continue;
        }
        if meta.file.read_exact_at(&mut block, rb).is_err() {
            w.report
                .corrupt(format!("cannot read refcount block {i} at {rb:#x}"));
            continue;
        }
        for j in 0..rb_entries {
            let c = i as u64 * rb_entries + j;
            let r = refcount_at(&block, j, h.refcount_order);
            if (c as usize) < n {
                stored[c as usize] = r;
            } else if r != 0 {
                w.report.leak(format!(
                    "cluster {c} past the end of the file has refcount {r}"
                ));
            }
        }
    }

    let mut report = std::mem::take(&mut w.report);
    let refs = std::mem::take(&mut w.refs);
    for (c, (&k, &s)) in refs.iter().zip(stored.iter()).enumerate() {
        let k = u64::from(k);
        if k > s {
            report.corrupt(format!("cluster {c} refcount={s} reference={k}"));
        } else if k < s {
            report.leak(format!("cluster {c} refcount={s} reference={k}"));
        }
        if k > 0 {
            report.image_end_offset = (c as u64 + 1) * cs;
        }
    }
    // The COPIED flag must be set exactly on clusters with refcount 1 (active image only).
    for (off, flag, what) in copied {
        let c = (off / cs) as usize;
        let s = stored.get(c).copied().unwrap_or(0);
        if s != 0 && flag != (s == 1) {
            report.corrupt(format!(
                "OFLAG_COPIED on {what}: refcount={s} copied={flag}"
            ));
        }
    }
    Ok(report)
}
