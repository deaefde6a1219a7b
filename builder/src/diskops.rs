//! The disk operations a build needs (overlays, conversion, capture), in one place so the
//! builder calls kiln-disk through a single narrow surface.
//!
//! Everything goes through kiln-disk; kiln never shells out to qemu-img.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiskOpError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Image formats kiln reads as sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Format (by magic) and virtual size of an image.
pub fn probe(path: &Path) -> Result<(ImageFormat, u64), DiskOpError> {
    let ioe = |source| DiskOpError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(ioe)?;
    let len = f.metadata().map_err(ioe)?.len();
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < head.len() {
        let n = f.read(&mut head[got..]).map_err(ioe)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got >= 32 && &head[..4] == b"QFI\xfb" {
        let mut sz = [0u8; 8];
        sz.copy_from_slice(&head[24..32]);
        return Ok((ImageFormat::Qcow2, u64::from_be_bytes(sz)));
    }
    Ok((ImageFormat::Raw, len))
}

fn disk_err(what: &str) -> impl FnOnce(kiln_disk::DiskError) -> DiskOpError + '_ {
    move |e| DiskOpError::Tool {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// raw -> qcow2, uncompressed (a cache base: booted from many times, so fast reads matter
/// more than its size).
pub fn convert_raw_to_qcow2(raw: &Path, out: &Path) -> Result<(), DiskOpError> {
    // Opened as raw, never probed: a file kiln calls raw is read as bytes, whatever it holds.
    let opts = kiln_disk::OpenOptions {
        format: Some(kiln_disk::Format::Raw),
        ..kiln_disk::OpenOptions::untrusted()
    };
    let src = kiln_disk::open(raw, opts).map_err(disk_err("opening the raw image"))?;
    kiln_disk::convert(src.as_ref(), out, &kiln_disk::ConvertOptions::default())
        .map_err(disk_err("converting to qcow2"))?;
    Ok(())
}

/// A qcow2 overlay on `base` (or a blank qcow2), with virtual size `size` (at least the
/// base's: kiln-disk refuses to shrink).
pub fn create_overlay(
    base: Option<(&Path, ImageFormat)>,
    out: &Path,
    size: u64,
) -> Result<(), DiskOpError> {
    match base {
        Some((b, _fmt)) => {
            // Absolute backing names: the overlay lives in another folder than its base.
            let abs = fs::canonicalize(b).map_err(|source| DiskOpError::Io {
                what: "resolving",
                path: b.to_path_buf(),
                source,
            })?;
            kiln_disk::create_overlay(out, &abs, Some(size))
                .map_err(disk_err("creating an overlay"))
        }
        None => kiln_disk::create(
            out,
            &kiln_disk::CreateOptions {
                size: Some(size),
                ..Default::default()
            },
        )
        .map_err(disk_err("creating a blank disk")),
    }
}

/// Flattens the chain under `top` into a standalone compressed qcow2 at `out`, streaming
/// (kiln-disk's writer: nothing is held whole in memory). Written to a temporary name first.
pub fn capture_compressed(top: &Path, out: &Path) -> Result<u64, DiskOpError> {
    let src = kiln_disk::open(top, kiln_disk::OpenOptions::read_only())
        .map_err(disk_err("opening the VM's disk"))?;
    let tmp = out.with_extension("qcow2.partial");
    let opts = kiln_disk::ConvertOptions {
        compress: Some(kiln_disk::Compression::DEFLATE),
        ..Default::default()
    };
    let stats = kiln_disk::convert(src.as_ref(), &tmp, &opts).map_err(disk_err("capturing"))?;
    fs::rename(&tmp, out).map_err(|source| DiskOpError::Io {
        what: "renaming",
        path: out.to_path_buf(),
        source,
    })?;
    Ok(stats.file_size)
}

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
/// `top` is the VM's overlay, whose backing file is `parent` (the parent module's disk).
/// Only clusters allocated in `top` can differ from the parent: each is read through the
/// whole chain, compared with the parent's, and stored (deflate-compressed, qcow2's 4 KiB
/// window) when different. A cluster the guest zeroed over parent data is stored as a
/// compressed zero cluster, so the layer never lets stale parent data show through.
/// `backing_name` goes into the header as is: a path relative to `out`'s folder keeps the
/// pair movable together. Written to a temporary name, then renamed.
pub fn capture_thin(
    top: &Path,
    parent: &Path,
    backing_name: &str,
    out: &Path,
) -> Result<ThinStats, DiskOpError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskOpError::Io { what, path, source }
    };
    let fmt = |path: &Path, reason: String| DiskOpError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let top_meta =
        kiln_disk::qcow2::meta::Meta::open(fs::File::open(top).map_err(io("opening", top))?)
            .map_err(|r| fmt(top, r))?;
    let chain = kiln_disk::chain(
        top,
        None,
        kiln_disk::MAX_CHAIN_DEPTH,
        &kiln_disk::BackingPolicy::Follow,
    )
    .map_err(disk_err("reading the VM's disk chain"))?;
    let parent_canon = fs::canonicalize(parent).map_err(io("resolving", parent))?;
    let backed_by_parent = chain
        .get(1)
        .and_then(|l| fs::canonicalize(&l.path).ok())
        .is_some_and(|p| p == parent_canon);
    if !backed_by_parent {
        return Err(fmt(
            top,
            format!(
                "a thin capture needs an overlay directly on {}",
                parent.display()
            ),
        ));
    }
    let child = kiln_disk::open(top, kiln_disk::OpenOptions::read_only())
        .map_err(disk_err("opening the VM's disk"))?;
    let parent_dev = kiln_disk::open(parent, kiln_disk::OpenOptions::read_only())
        .map_err(disk_err("opening the parent disk"))?;
    let size = child.size();
    let parent_size = parent_dev.size();
    let bits = top_meta.header.cluster_bits;
    let cs = 1u64 << bits;

    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-thin-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file in", dir))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(io("opening", tmp.path()))?;
    let mut w = kiln_disk::qcow2::writer::StreamWriter::new(
        file,
        size,
        bits,
        kiln_disk::qcow2::header::CompressionType::Deflate,
    )
    .map_err(io("writing", out))?;
    w.set_backing(backing_name.to_string(), "qcow2".to_string());

    let mut stats = ThinStats::default();
    let mut mine = vec![0u8; cs as usize];
    let mut theirs = vec![0u8; cs as usize];
    // Raw deflate with a 4 KiB window, as qcow2 readers (qemu's included) expect. Level 2:
    // zlib-rs's level-1 strategy mishandles small windows (see kiln-disk's convert).
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::new(2), false, 12);
    let mut zbuf = vec![0u8; cs as usize + cs as usize / 8 + 1024];
    let l2_entries = cs / 8;
    let clusters = size.div_ceil(cs);
    let mut gc = 0u64;
    while gc < clusters {
        // Whole L2 ranges the overlay never touched are skipped without a lookup each.
        let l1 = (gc / l2_entries) as usize;
        if top_meta
            .l1
            .get(l1)
            .is_none_or(|e| e & kiln_disk::qcow2::meta::OFFSET_MASK == 0)
        {
            gc = (l1 as u64 + 1) * l2_entries;
            continue;
        }
        let c = top_meta.lookup(gc).map_err(|r| fmt(top, r))?;
        if c == kiln_disk::qcow2::meta::Cluster::Unallocated {
            gc += 1;
            continue;
        }
        let off = gc * cs;
        let len = cs.min(size - off) as usize;
        child
            .read_at(&mut mine[..len], off)
            .map_err(|e| fmt(top, e.to_string()))?;
        theirs[..len].fill(0);
        if off < parent_size {
            let plen = (len as u64).min(parent_size - off) as usize;
            parent_dev
                .read_at(&mut theirs[..plen], off)
                .map_err(|e| fmt(parent, e.to_string()))?;
        }
        if mine[..len] == theirs[..len] {
            stats.same_clusters += 1;
            gc += 1;
            continue;
        }
        stats.changed_clusters += 1;
        let compressed = if len as u64 == cs {
            z.reset();
            match z.compress(&mine, &mut zbuf, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if (z.total_out() as usize) + 512 <= len => {
                    Some(z.total_out() as usize)
                }
                _ => None,
            }
        } else {
            None
        };
        match compressed {
            Some(n) => w.write_compressed(gc, &zbuf[..n]),
            None => w.write_cluster(gc, &mine[..len]),
        }
        .map_err(io("writing", out))?;
        gc += 1;
    }
    let f = w.finish().map_err(io("writing", out))?;
    f.sync_all().map_err(io("syncing", out))?;
    stats.file_size = f.metadata().map_err(io("reading", out))?.len();
    tmp.persist(out).map_err(|e| DiskOpError::Io {
        what: "renaming into",
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(stats)
}

/// `to` relative to the folder `from_dir` (both absolute, canonical): the backing name of a
/// thin layer, so a module and its parent can move together.
pub fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from_dir.components().collect();
    let to_c: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to_c).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..from.len() {
        p.push("..");
    }
    for c in &to_c[common..] {
        p.push(c.as_os_str());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_raw_and_qcow2_header() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("a.raw");
        fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(probe(&raw).unwrap(), (ImageFormat::Raw, 4096));
        let q = d.path().join("b.qcow2");
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());
        fs::write(&q, h).unwrap();
        assert_eq!(probe(&q).unwrap(), (ImageFormat::Qcow2, 5 << 30));
        assert!(probe(&d.path().join("missing")).is_err());
    }

    #[test]
    fn relative_paths_between_module_folders() {
        assert_eq!(
            relative_path(
                Path::new("/m/child/disks"),
                Path::new("/m/parent/disks/p-root.qcow2")
            ),
            Path::new("../../parent/disks/p-root.qcow2")
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/c.qcow2")),
            Path::new("c.qcow2")
        );
        assert_eq!(
            relative_path(Path::new("/x/y/z"), Path::new("/q/p.qcow2")),
            Path::new("../../../q/p.qcow2")
        );
    }

    /// A parent with data, a child overlay that changes some clusters, zeroes one, rewrites
    /// one identically and grows the disk: the thin layer over the parent must read back
    /// exactly as the child, store only the changes, and name its parent relatively.
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
        capture_compressed(&praw, &parent).unwrap();

        let work = d.path().join("work");
        fs::create_dir_all(&work).unwrap();
        let top = work.join("c-root.qcow2");
        create_overlay(Some((&parent, ImageFormat::Qcow2)), &top, 128 * cs).unwrap();
        {
            let dev = kiln_disk::open(&top, kiln_disk::OpenOptions::read_write()).unwrap();
            dev.write_at(&pattern(1000), 3 * cs).unwrap(); // changed
            dev.write_at(&vec![0u8; cs as usize], 5 * cs).unwrap(); // zeroed over data
            dev.write_at(&pattern(7), 7 * cs).unwrap(); // identical rewrite
            dev.write_at(b"partial", 9 * cs + 100).unwrap(); // part of a cluster
            dev.write_at(&pattern(2000), 100 * cs).unwrap(); // past the parent's end
            dev.flush().unwrap();
        }
        let cdir = d.path().join("child/disks");
        fs::create_dir_all(&cdir).unwrap();
        let out = cdir.join("c-root.qcow2");
        let rel = relative_path(&cdir, &parent);
        assert_eq!(rel, Path::new("../../parent/disks/p-root.qcow2"));
        let st = capture_thin(&top, &parent, rel.to_str().unwrap(), &out).unwrap();
        assert_eq!(st.changed_clusters, 4, "{st:?}");
        assert_eq!(st.same_clusters, 1, "{st:?}");

        let info = kiln_disk::info(&out, &kiln_disk::BackingPolicy::Follow).unwrap();
        assert_eq!(
            info.top.backing_file.as_deref(),
            Some("../../parent/disks/p-root.qcow2")
        );
        assert_eq!(info.top.virtual_size, 128 * cs);
        // The layer holds only what changed: far smaller than the parent's 4 MiB.
        assert!(st.file_size < 1 << 20, "{st:?}");
        let thin = kiln_disk::open(&out, kiln_disk::OpenOptions::read_only()).unwrap();
        let child = kiln_disk::open(&top, kiln_disk::OpenOptions::read_only()).unwrap();
        let (mut a, mut b) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
        for c in 0..128 {
            thin.read_at(&mut a, c * cs).unwrap();
            child.read_at(&mut b, c * cs).unwrap();
            assert!(a == b, "cluster {c} differs");
        }
        let rep = kiln_disk::check(&out).unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        // Whole folders move together: the relative backing name still resolves.
        let moved = d.path().join("moved");
        fs::create_dir_all(&moved).unwrap();
        fs::rename(d.path().join("parent"), moved.join("parent")).unwrap();
        fs::rename(d.path().join("child"), moved.join("child")).unwrap();
        let again = kiln_disk::open(
            moved.join("child/disks/c-root.qcow2"),
            kiln_disk::OpenOptions::read_only(),
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
        create_overlay(Some((&a, ImageFormat::Raw)), &top, 1 << 20).unwrap();
        let e = capture_thin(&top, &b, "b.raw", &d.path().join("out.qcow2")).unwrap_err();
        assert!(e.to_string().contains("thin capture"), "{e}");
        assert!(!d.path().join("out.qcow2").exists());
    }
}
