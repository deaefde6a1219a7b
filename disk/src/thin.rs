//! Thin layers: what a VM changed over its parent disk, as a compressed qcow2 layer backed by
//! that parent. Only the clusters the overlay allocated can differ, so the walk goes over the
//! overlay's own L1/L2 tables and compares just those clusters with the parent.

use std::fs::File;
use std::path::Path;

use crate::convert::{temp_beside, Compressor};
use crate::error::{block_err, corrupt, io_err, DiskError, Result};
use crate::qcow2::header::CompressionType;
use crate::qcow2::meta::{Cluster, Meta, OFFSET_MASK};
use crate::qcow2::writer::StreamWriter;
use crate::{chain, open, BackingPolicy, Compression, OpenOptions, MAX_CHAIN_DEPTH};

/// What a thin capture wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThinStats {
    /// Clusters the VM changed relative to its parent, stored in the layer.
    pub changed_clusters: u64,
    /// Clusters the VM wrote but left identical to the parent (not stored).
    pub same_clusters: u64,
    pub file_size: u64,
}

/// Writes what the VM changed as a compressed qcow2 layer at `out`, backed by `parent`.
///
/// `top` is the VM's qcow2 overlay, whose backing file is `parent`. Only clusters allocated
/// in `top` can differ from the parent: each is read through the whole chain, compared with
/// the parent's, and stored (deflate-compressed, qcow2's 4 KiB window) when different. A
/// cluster the guest zeroed over parent data is stored as a compressed zero cluster, so the
/// layer never lets stale parent data show through. `backing_name` goes into the header as
/// is: a path relative to `out`'s folder keeps the pair movable together. Written to a
/// temporary name, then renamed.
pub fn capture_thin(
    top: &Path,
    parent: &Path,
    backing_name: &str,
    out: &Path,
) -> Result<ThinStats> {
    let layers = chain(top, None, MAX_CHAIN_DEPTH, &BackingPolicy::Follow)?;
    let parent_canon = std::fs::canonicalize(parent).map_err(io_err(parent))?;
    // The images between the VM's overlay and its parent (the step cache's layers, when the
    // build took any): a cluster any of them allocated can differ from the parent.
    let above = layers
        .iter()
        .skip(1)
        .position(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == parent_canon))
        .map(|i| i + 1)
        .ok_or_else(|| DiskError::NotOverParent {
            top: top.to_path_buf(),
            parent: parent.to_path_buf(),
        })?;
    let mut metas = Vec::with_capacity(above);
    for l in &layers[..above] {
        let p = &l.path;
        let m = Meta::open(File::open(p).map_err(io_err(p))?).map_err(corrupt(p))?;
        metas.push((p.clone(), m));
    }
    let top_meta = &metas[0].1;
    if let Some((p, _)) = metas
        .iter()
        .find(|(_, m)| m.header.cluster_bits != top_meta.header.cluster_bits)
    {
        return Err(DiskError::Invalid(format!(
            "{}: its cluster size differs from {}'s; a thin capture over layers of mixed \
             cluster sizes is not supported",
            p.display(),
            top.display()
        )));
    }
    let child = open(top, OpenOptions::read_only())?;
    let parent_dev = open(parent, OpenOptions::read_only())?;
    let size = child.size();
    let parent_size = parent_dev.size();
    let bits = top_meta.header.cluster_bits;
    let cs = 1u64 << bits;

    let tmp = temp_beside(out, ".kiln-thin-")?;
    let file = tmp.as_file().try_clone().map_err(io_err(tmp.path()))?;
    let mut w =
        StreamWriter::new(file, size, bits, CompressionType::Deflate).map_err(io_err(out))?;
    w.set_backing(backing_name.to_string(), "qcow2".to_string());

    let mut stats = ThinStats::default();
    let mut mine = vec![0u8; cs as usize];
    let mut theirs = vec![0u8; cs as usize];
    let mut z = Compressor::new(Some(Compression::DEFLATE)).map_err(io_err(out))?;
    let l2_entries = cs / 8;
    let clusters = size.div_ceil(cs);
    let mut gc = 0u64;
    while gc < clusters {
        // Whole L2 ranges no layer above the parent touched are skipped without a lookup.
        let l1 = (gc / l2_entries) as usize;
        if metas
            .iter()
            .all(|(_, m)| m.l1.get(l1).is_none_or(|e| e & OFFSET_MASK == 0))
        {
            gc = (l1 as u64 + 1) * l2_entries;
            continue;
        }
        let mut touched = false;
        for (p, m) in &metas {
            if m.lookup(gc).map_err(corrupt(p))? != Cluster::Unallocated {
                touched = true;
                break;
            }
        }
        if !touched {
            gc += 1;
            continue;
        }
        let off = gc * cs;
        let len = cs.min(size - off) as usize;
        child
            .read_at(&mut mine[..len], off)
            .map_err(block_err(top))?;
        theirs[..len].fill(0);
        if off < parent_size {
            let plen = (len as u64).min(parent_size - off) as usize;
            parent_dev
                .read_at(&mut theirs[..plen], off)
                .map_err(block_err(parent))?;
        }
        if mine[..len] == theirs[..len] {
            stats.same_clusters += 1;
            gc += 1;
            continue;
        }
        stats.changed_clusters += 1;
        // Only whole clusters are compressed: a short last cluster is stored plain.
        let compressed = if len as u64 == cs {
            z.compress(&mine)
        } else {
            None
        };
        match compressed {
            Some(c) => w.write_compressed(gc, &c),
            None => w.write_cluster(gc, &mine[..len]),
        }
        .map_err(io_err(out))?;
        gc += 1;
    }
    let f = w.finish().map_err(io_err(out))?;
    f.sync_all().map_err(io_err(out))?;
    stats.file_size = f.metadata().map_err(io_err(out))?.len();
    tmp.persist(out).map_err(|e| DiskError::Io {
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::{create_overlay, ConvertOptions};

    /// A parent with data, a child overlay that changes some clusters, zeroes one, rewrites
    /// one identically and grows the disk, with a step cache layer between (the first changes
    /// in it): the thin layer over the parent must read back exactly as the child, store only
    /// the changes, and name its parent relatively.
    #[test]
    fn thin_capture_stores_only_the_changes() {
        let d = tempfile::tempdir().unwrap();
        let cs = 65536u64;
        let pattern =
            |seed: u64| -> Vec<u8> { (0..cs).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect() };
        // The parent: 64 clusters of data, made through a raw image and convert.
        let praw = d.path().join("p.raw");
        let mut pdata = Vec::new();
        for c in 0..64 {
            pdata.extend(pattern(c));
        }
        fs::write(&praw, &pdata).unwrap();
        let pdir = d.path().join("parent/disks");
        fs::create_dir_all(&pdir).unwrap();
        let parent = pdir.join("p-root.qcow2");
        let raw = crate::open(&praw, OpenOptions::read_only()).unwrap();
        let opts = ConvertOptions {
            compress: Some(Compression::DEFLATE),
            ..Default::default()
        };
        crate::convert(raw.as_ref(), &parent, &opts).unwrap();

        let work = d.path().join("work");
        fs::create_dir_all(&work).unwrap();
        let top = work.join("c-root.qcow2");
        create_overlay(&top, &parent, Some(128 * cs)).unwrap();
        {
            use crate::BlockDevice as _;
            let dev = crate::LiveDisk::open(&top, crate::OpenOptions::read_write()).unwrap();
            dev.write_at(&pattern(1000), 3 * cs).unwrap(); // changed
            dev.write_at(&vec![0u8; cs as usize], 5 * cs).unwrap(); // zeroed over data
                                                                    // A step cache layer between the overlay and the parent: its changes count too.
            dev.checkpoint(&work.join("layer-1.qcow2")).unwrap();
            dev.write_at(&pattern(7), 7 * cs).unwrap(); // identical rewrite
            dev.write_at(b"partial", 9 * cs + 100).unwrap(); // part of a cluster
            dev.write_at(&pattern(2000), 100 * cs).unwrap(); // past the parent's end
            dev.flush().unwrap();
        }
        let cdir = d.path().join("child/disks");
        fs::create_dir_all(&cdir).unwrap();
        let out = cdir.join("c-root.qcow2");
        // The backing name a module gives a thin layer: relative, so the pair can move together.
        let st = capture_thin(&top, &parent, "../../parent/disks/p-root.qcow2", &out).unwrap();
        assert_eq!(st.changed_clusters, 4, "{st:?}");
        assert_eq!(st.same_clusters, 1, "{st:?}");

        let info = crate::info(&out, &crate::BackingPolicy::Follow).unwrap();
        assert_eq!(
            info.top.backing_file.as_deref(),
            Some("../../parent/disks/p-root.qcow2")
        );
        assert_eq!(info.top.virtual_size, 128 * cs);
        // The layer holds only what changed: far smaller than the parent's 4 MiB.
        assert!(st.file_size < 1 << 20, "{st:?}");
        let thin = crate::open(&out, crate::OpenOptions::read_only()).unwrap();
        let child = crate::open(&top, crate::OpenOptions::read_only()).unwrap();
        let (mut a, mut b) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
        for c in 0..128 {
            thin.read_at(&mut a, c * cs).unwrap();
            child.read_at(&mut b, c * cs).unwrap();
            assert!(a == b, "cluster {c} differs");
        }
        let rep = crate::check(&out).unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        // Whole folders move together: the relative backing name still resolves.
        let moved = d.path().join("moved");
        fs::create_dir_all(&moved).unwrap();
        fs::rename(d.path().join("parent"), moved.join("parent")).unwrap();
        fs::rename(d.path().join("child"), moved.join("child")).unwrap();
        let again = crate::open(
            moved.join("child/disks/c-root.qcow2"),
            crate::OpenOptions::read_only(),
        )
        .unwrap();
        again.read_at(&mut a, 3 * cs).unwrap();
        assert!(a == pattern(1000));
        again.read_at(&mut a, 4 * cs).unwrap();
        assert!(a == pattern(4), "unchanged clusters come from the parent");
        if std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok()
        {
            let o = std::process::Command::new("qemu-img")
                .arg("check")
                .arg(moved.join("child/disks/c-root.qcow2"))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        }
    }

    #[test]
    fn thin_capture_refuses_an_overlay_on_another_base() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.raw");
        fs::write(&a, vec![1u8; 1 << 20]).unwrap();
        let b = d.path().join("b.raw");
        fs::write(&b, vec![2u8; 1 << 20]).unwrap();
        let top = d.path().join("top.qcow2");
        create_overlay(&top, &a, Some(1 << 20)).unwrap();
        let e = capture_thin(&top, &b, "b.raw", &d.path().join("out.qcow2")).unwrap_err();
        assert!(e.to_string().contains("thin capture"), "{e}");
        assert!(!d.path().join("out.qcow2").exists());
    }
}
