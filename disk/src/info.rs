//! `info` and `map`: what an image is and where its data lives.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{corrupt, io_err, Result};
use crate::open::{chain, BackingPolicy, Format, MAX_CHAIN_DEPTH};
use crate::qcow2::header::CompressionType;
use crate::qcow2::meta::{Cluster, Meta};

/// One image of a chain.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the file occupies on disk (allocated blocks).
    pub allocated_bytes: u64,
    /// Length of the file.
    pub file_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<CompressionType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u32>,
    /// Backing name as written in the header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
    /// Refcount width in bits (qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u32>,
    /// qcow2 header flags: dirty (incompatible bit 0), corrupt (bit 1), lazy refcounts
    /// (compatible bit 0).
    pub dirty: bool,
    pub corrupt: bool,
    pub lazy_refcounts: bool,
}

/// `info` of an image: the top layer's facts plus the whole backing chain.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub top: LayerInfo,
    /// Every layer, top first (the first entry repeats `top`).
    pub chain: Vec<LayerInfo>,
}

/// Describe an image and the backing chain `policy` lets it follow.
pub fn info(path: impl AsRef<Path>, policy: &BackingPolicy) -> Result<ImageInfo> {
    let layers = chain(path.as_ref(), None, MAX_CHAIN_DEPTH, policy)?;
    let mut out = Vec::new();
    for l in &layers {
        let md = std::fs::metadata(&l.path).map_err(io_err(&l.path))?;
        let h = l.header.as_ref();
        out.push(LayerInfo {
            path: l.path.clone(),
            format: l.format,
            virtual_size: h.map_or(md.len(), |h| h.size),
            allocated_bytes: md.blocks() * 512,
            file_size: md.len(),
            cluster_size: h.map(|h| h.cluster_size()),
            qcow2_version: h.map(|h| h.version),
            compression_type: h.map(|h| h.compression_type),
            snapshots: h.map(|h| h.nb_snapshots),
            backing_file: h.and_then(|h| h.backing_file.clone()),
            backing_format: h.and_then(|h| h.backing_format.clone()),
            refcount_bits: h.map(|h| 1 << h.refcount_order),
            dirty: h.is_some_and(|h| h.incompatible_features & 1 != 0),
            corrupt: h.is_some_and(|h| h.incompatible_features & 2 != 0),
            lazy_refcounts: h.is_some_and(|h| h.compatible_features & 1 != 0),
        });
    }
    Ok(ImageInfo {
        top: out[0].clone(),
        chain: out,
    })
}

/// What a guest range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Data stored in layer `depth`.
    Data,
    /// Data stored compressed in layer `depth`.
    Compressed,
    /// Reads as zeroes (explicit zero clusters, or nothing allocated anywhere).
    Zero,
}

/// One extent of [`map`].
#[derive(Debug, Clone, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// Which layer answers (0 = top); absent when no layer holds the range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    /// Host offset in that layer's file, for plain data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// Where every guest range of an image (and the chain `policy` lets it follow) is stored,
/// merged into extents.
///
/// Raw layers count as data throughout; qcow2 layers are read cluster by cluster through
/// kiln's own metadata reader.
pub fn map(path: impl AsRef<Path>, policy: &BackingPolicy) -> Result<Vec<Extent>> {
    let layers = chain(path.as_ref(), None, MAX_CHAIN_DEPTH, policy)?;
    let mut metas = Vec::new();
    for l in &layers {
        metas.push(match l.format {
            Format::Qcow2 => {
                let f = File::open(&l.path).map_err(io_err(&l.path))?;
                Some(Meta::open(f).map_err(corrupt(&l.path))?)
            }
            Format::Raw => None,
        });
    }
    let size = metas[0].as_ref().map_or_else(
        || {
            std::fs::metadata(&layers[0].path)
                .map(|m| m.len())
                .unwrap_or(0)
        },
        |m| m.header.size,
    );
    // Step by the smallest cluster size in the chain (raw layers: 64 KiB).
    let step = metas
        .iter()
        .map(|m| m.as_ref().map_or(65536, |m| m.header.cluster_size()))
        .min()
        .unwrap_or(65536);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    let raw_sizes: Vec<u64> = layers
        .iter()
        .map(|l| std::fs::metadata(&l.path).map(|m| m.len()).unwrap_or(0))
        .collect();
    while pos < size {
        // Skip whole L2 ranges no layer maps: the work stays bounded by the files' tables,
        // never by a (possibly absurd) virtual size.
        if let Some(skip_to) = unmapped_until(&metas, &raw_sizes, pos) {
            let end = skip_to.min(size);
            push_merge(
                &mut out,
                Extent {
                    start: pos,
                    length: end - pos,
                    kind: ExtentKind::Zero,
                    depth: None,
                    offset: None,
                    file: None,
                },
            );
            pos = end;
            continue;
        }
        let len = step.min(size - pos);
        let mut ext = Extent {
            start: pos,
            length: len,
            kind: ExtentKind::Zero,
            depth: None,
            offset: None,
            file: None,
        };
        for (depth, (l, m)) in layers.iter().zip(&metas).enumerate() {
            match m {
                None => {
                    let lsize = std::fs::metadata(&l.path).map(|m| m.len()).unwrap_or(0);
                    if pos < lsize {
                        ext.kind = ExtentKind::Data;
                        ext.depth = Some(depth);
                        ext.offset = Some(pos);
                        ext.file = Some(l.path.clone());
                    }
                    break;
                }
                Some(m) => {
                    if pos >= m.header.size {
                        break;
                    }
                    let cs = m.header.cluster_size();
                    match m.lookup(pos / cs).map_err(corrupt(&l.path))? {
                        Cluster::Unallocated => continue,
                        Cluster::Zero => {
                            ext.depth = Some(depth);
                            ext.file = Some(l.path.clone());
                        }
                        Cluster::Data(h) => {
                            ext.kind = ExtentKind::Data;
                            ext.depth = Some(depth);
                            ext.offset = Some(h + pos % cs);
                            ext.file = Some(l.path.clone());
                        }
                        Cluster::Compressed { .. } => {
                            ext.kind = ExtentKind::Compressed;
                            ext.depth = Some(depth);
                            ext.file = Some(l.path.clone());
                        }
                    }
                    break;
                }
            }
        }
        push_merge(&mut out, ext);
        pos += len;
    }
    Ok(out)
}

/// If no layer maps anything in the L2 range around `pos`, the end of the smallest such range.
fn unmapped_until(metas: &[Option<Meta>], raw_sizes: &[u64], pos: u64) -> Option<u64> {
    let mut until = u64::MAX;
    for (m, &rs) in metas.iter().zip(raw_sizes) {
        match m {
            None => {
                if pos < rs {
                    return None;
                }
                // A raw layer ends the chain.
                break;
            }
            Some(m) => {
                let span = m.header.cluster_size() * m.header.l2_entries();
                let idx = (pos / span) as usize;
                if m.l1
                    .get(idx)
                    .is_some_and(|e| e & crate::qcow2::meta::OFFSET_MASK != 0)
                {
                    return None;
                }
                until = until.min((idx as u64 + 1) * span);
            }
        }
    }
    Some(until)
}

fn push_merge(out: &mut Vec<Extent>, ext: Extent) {
    let merge = out.last().is_some_and(|p| {
        p.kind == ext.kind
            && p.depth == ext.depth
            && match (p.offset, ext.offset) {
                (Some(a), Some(b)) => a + p.length == b,
                (None, None) => true,
                _ => false,
            }
    });
    match out.last_mut() {
        Some(p) if merge => p.length += ext.length,
        _ => out.push(ext),
    }
}
