//! The disk operations a build needs (overlays, conversion, capture), in one place so the
//! builder calls kiln-disk through a single narrow surface.
//!
//! Everything goes through kiln-disk; kiln never shells out to qemu-img.

use crate::path_io::PathIoError;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiskOpError {
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Disk(#[from] kiln_disk::DiskError),
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
    let ioe = |source| crate::path_io::PathIoError {
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
            let abs = fs::canonicalize(b).map_err(PathIoError::at("resolving", b))?;
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
    fs::rename(&tmp, out).map_err(PathIoError::at("renaming", out))?;
    Ok(stats.file_size)
}

/// Writes what the VM changed over `parent` as a compressed qcow2 layer at `out`, backed by
/// `parent` under `backing_name` (see [`kiln_disk::capture_thin`]).
pub fn capture_thin(
    top: &Path,
    parent: &Path,
    backing_name: &str,
    out: &Path,
) -> Result<kiln_disk::ThinStats, DiskOpError> {
    Ok(kiln_disk::capture_thin(top, parent, backing_name, out)?)
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
}
