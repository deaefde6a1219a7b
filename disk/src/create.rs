//! Creating images and overlays, and resizing.

use std::path::Path;

use crate::error::{io_err, DiskError, Result};
use crate::open::{chain, resolve_backing, top_layer, BackingPolicy, Format, MAX_CHAIN_DEPTH};
use crate::qcow2::header::CompressionType;
use crate::qcow2::writer::StreamWriter;

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size; `None` takes the backing image's size (an error without backing).
    pub size: Option<u64>,
    /// qcow2 cluster size, a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Backing file name exactly as it goes into the header: an absolute path, or a path
    /// relative to the directory of the new image (as qemu resolves it).
    pub backing: Option<String>,
    /// Backing format; `None` probes it.
    pub backing_format: Option<Format>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: 65536,
            backing: None,
            backing_format: None,
        }
    }
}

fn temp_in(dst: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".kiln-create-")
        .tempfile_in(dir)
        .map_err(io_err(dir))
}

/// Create a new, empty image (written to a temporary name, then renamed).
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(DiskError::Invalid(format!(
            "cluster size {cs} must be a power of two from 512 B to 2 MiB"
        )));
    }
    let mut backing = None;
    if let Some(name) = &opts.backing {
        if opts.format == Format::Raw {
            return Err(DiskError::Invalid(
                "a raw image cannot have a backing file".into(),
            ));
        }
        let target = resolve_backing(path, name);
        // Reading the whole chain proves the backing opens and has no loop. Only headers
        // are read, nothing goes into the new image, and the user named this backing file:
        // whoever opens the overlay applies its own backing policy.
        let layers = chain(
            &target,
            opts.backing_format,
            MAX_CHAIN_DEPTH,
            &BackingPolicy::Follow,
        )?;
        let size = match &layers[0].header {
            Some(h) => h.size,
            None => std::fs::metadata(&target).map_err(io_err(&target))?.len(),
        };
        backing = Some((name.clone(), layers[0].format, size));
    }
    let size = match (opts.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, _, s))) => *s,
        (None, None) => {
            return Err(DiskError::Invalid(
                "a size is needed without a backing file".into(),
            ))
        }
    };
    if size > crate::qcow2::header::MAX_VIRTUAL_SIZE {
        return Err(DiskError::Invalid(format!("size {size} is too large")));
    }
    let tmp = temp_in(path)?;
    let file = tmp.as_file().try_clone().map_err(io_err(tmp.path()))?;
    match opts.format {
        Format::Raw => file.set_len(size).map_err(io_err(path))?,
        Format::Qcow2 => {
            let mut w =
                StreamWriter::new(file, size, cs.trailing_zeros(), CompressionType::Deflate)
                    .map_err(io_err(path))?;
            if let Some((name, fmt, _)) = backing {
                w.set_backing(name, fmt.name().to_string());
            }
            w.finish().map_err(io_err(path))?;
        }
    }
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| DiskError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Create a qcow2 overlay on `backing` (qcow2 or raw, probed). The backing name is stored as
/// given: relative names are relative to the overlay's directory. `size` defaults to the
/// backing image's size.
pub fn create_overlay(
    path: impl AsRef<Path>,
    backing: impl AsRef<Path>,
    size: Option<u64>,
) -> Result<()> {
    let name = backing.as_ref().to_str().ok_or_else(|| {
        DiskError::Invalid(format!(
            "backing path {} is not UTF-8",
            backing.as_ref().display()
        ))
    })?;
    create(
        path,
        &CreateOptions {
            size,
            backing: Some(name.to_string()),
            ..Default::default()
        },
    )
}

/// The virtual size of the image at `path` alone (its backing file, if any, is not opened).
pub fn virtual_size(path: impl AsRef<Path>) -> Result<u64> {
    let path = path.as_ref();
    let top = top_layer(path)?;
    match &top.header {
        Some(h) => Ok(h.size),
        None => Ok(std::fs::metadata(path).map_err(io_err(path))?.len()),
    }
}

/// Grow an image to `new_size` bytes (qcow2 or raw). Shrinking is refused: it would drop data.
pub fn resize(path: impl AsRef<Path>, new_size: u64) -> Result<()> {
    let path = path.as_ref();
    let top = top_layer(path)?;
    let cur = match &top.header {
        Some(h) => h.size,
        None => std::fs::metadata(path).map_err(io_err(path))?.len(),
    };
    if new_size < cur {
        return Err(DiskError::Invalid(format!(
            "{}: shrinking from {cur} to {new_size} bytes is refused: it would drop the data \
             past the new end, and kiln does not shrink images",
            path.display()
        )));
    }
    if new_size > crate::qcow2::header::MAX_VIRTUAL_SIZE {
        return Err(DiskError::Invalid(format!("size {new_size} is too large")));
    }
    match top.format {
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            f.set_len(new_size).map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))
        }
        Format::Qcow2 => crate::open::resize_qcow2(&top, new_size),
    }
}
