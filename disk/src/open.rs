//! Opening an image: format detection and backing chains.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::FormatAccess;

use crate::error::{corrupt, io_err, DiskError, Result};
use crate::qcow2::header::{is_qcow2, CompressionType, Header};
use crate::qcow2::imago_dev::ImagoDevice;
use crate::qcow2::meta::Meta;
use crate::qcow2::reader::Qcow2Reader;
use crate::raw::RawDevice;
use crate::BlockDevice;

/// Longest backing chain kiln follows (qemu has no fixed limit; 64 is far beyond any real
/// chain and stops a crafted one from exhausting file descriptors).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Image formats kiln reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse writes (backing layers are always read-only).
    pub read_only: bool,
    /// Force a format instead of probing the top image (backing layers use the format named
    /// in their overlay's header, else a probe).
    pub format: Option<Format>,
    /// Longest backing chain to follow.
    pub max_chain_depth: usize,
    /// Which backing files may be followed. The default ([`BackingPolicy::Follow`]) is only
    /// for chains kiln wrote itself; images from anywhere else take
    /// [`OpenOptions::untrusted`] or an explicit [`BackingPolicy::Only`].
    pub backing: BackingPolicy,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            format: None,
            max_chain_depth: MAX_CHAIN_DEPTH,
            backing: BackingPolicy::Follow,
        }
    }
}

impl OpenOptions {
    /// Read-only, following backing files: for chains kiln wrote itself.
    pub fn read_only() -> Self {
        Self::default()
    }
    /// Read-write, following backing files: for chains kiln wrote itself.
    pub fn read_write() -> Self {
        OpenOptions {
            read_only: false,
            ..Self::default()
        }
    }
    /// Read-only, refusing any backing file: for images from outside (downloads, user files).
    pub fn untrusted() -> Self {
        OpenOptions {
            backing: BackingPolicy::Refuse,
            ..Self::default()
        }
    }
    pub fn with_backing(self, backing: BackingPolicy) -> Self {
        OpenOptions { backing, ..self }
    }
}

/// Which backing files opening an image may follow.
///
/// A backing name is a host path written in the image: an image from outside kiln could name
/// any file (`/etc/shadow`, `/dev/sda`, `../../..`), and following it would read that file
/// into the guest and into whatever the image is converted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Follow every backing name: only for chains kiln wrote itself (its build and clone
    /// overlays, thin module layers).
    Follow,
    /// Refuse any image of the chain that names a backing file.
    Refuse,
    /// Follow only to these files (canonical paths; see [`BackingPolicy::only`]).
    Only(Vec<PathBuf>),
}

impl BackingPolicy {
    /// Allow exactly these files as backing files, compared after canonicalizing (so
    /// symlinks, `..` and relative names all meet the same path).
    pub fn only<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<BackingPolicy> {
        let mut out = Vec::new();
        for p in paths {
            let p = p.as_ref();
            out.push(std::fs::canonicalize(p).map_err(io_err(p))?);
        }
        Ok(BackingPolicy::Only(out))
    }

    /// Whether `image` may follow its backing name `name`, which resolves to `target`.
    fn permit(&self, image: &Path, name: &str, target: &Path) -> Result<()> {
        let refused = |why: String| DiskError::BackingRefused {
            image: image.to_path_buf(),
            name: name.to_string(),
            why,
        };
        match self {
            BackingPolicy::Follow => Ok(()),
            BackingPolicy::Refuse => Err(refused(
                "backing files of untrusted images are not followed".into(),
            )),
            BackingPolicy::Only(allowed) => {
                let canon = std::fs::canonicalize(target)
                    .map_err(|e| refused(format!("it resolves to {}: {e}", target.display())))?;
                if allowed.contains(&canon) {
                    Ok(())
                } else {
                    Err(refused(format!(
                        "it resolves to {}, which was not named as an allowed backing file",
                        canon.display()
                    )))
                }
            }
        }
    }
}

/// One layer of a chain, as found in the headers (nothing opened for I/O yet).
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub format: Format,
    /// The header, for qcow2 layers.
    pub header: Option<Header>,
    /// The backing name exactly as written in the header.
    pub backing_name: Option<String>,
}

/// Probe the format of a file.
pub fn detect_format(path: &Path) -> Result<Format> {
    let f = File::open(path).map_err(io_err(path))?;
    Ok(if is_qcow2(&f).map_err(io_err(path))? {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Where a backing name written in `image`'s header points: relative names are relative to
/// the directory of the overlay, as qemu resolves them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Read the headers of the whole chain starting at `path`, top first, refusing loops,
/// over-deep chains, bad headers and backing files `policy` does not allow, without opening
/// anything for I/O. A refused backing file is never opened, not even to probe it.
pub fn chain(
    path: &Path,
    format: Option<Format>,
    max_depth: usize,
    policy: &BackingPolicy,
) -> Result<Vec<Layer>> {
    chain_inner(path, format, max_depth, Some(policy))
}

/// The top image's header alone, its backing name recorded but neither checked nor opened
/// (for `resize`, which changes only the top image).
pub(crate) fn top_layer(path: &Path) -> Result<Layer> {
    let mut layers = chain_inner(path, None, 1, None)?;
    Ok(layers.remove(0))
}

/// The backing name written in an image's header (None for raw images and images without
/// one); nothing below is opened.
pub fn backing_name(path: &Path) -> Result<Option<String>> {
    Ok(top_layer(path)?.backing_name)
}

/// [`chain`]; without a policy, stops after the top image.
fn chain_inner(
    path: &Path,
    format: Option<Format>,
    max_depth: usize,
    policy: Option<&BackingPolicy>,
) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, fmt)) = next.take() {
        if layers.len() >= max_depth {
            return Err(DiskError::ChainTooDeep {
                path: path.to_path_buf(),
                max: max_depth,
            });
        }
        // Identify files by device and inode: robust against symlinks, `..` and
        // /proc/self/fd paths alike.
        let md = std::fs::metadata(&p).map_err(io_err(&p))?;
        if !seen.insert((md.dev(), md.ino())) {
            return Err(DiskError::BackingLoop {
                path: path.to_path_buf(),
                again: p,
            });
        }
        let fmt = match fmt {
            Some(f) => f,
            None => detect_format(&p)?,
        };
        let layer = match fmt {
            Format::Raw => Layer {
                path: p,
                format: fmt,
                header: None,
                backing_name: None,
            },
            Format::Qcow2 => {
                let f = File::open(&p).map_err(io_err(&p))?;
                let len = f.metadata().map_err(io_err(&p))?.len();
                let h = Header::read(&f, len).map_err(corrupt(&p))?;
                validate_l1(&f, len, &h).map_err(corrupt(&p))?;
                if let Some(name) = &h.backing_file {
                    let bfmt = match h.backing_format.as_deref() {
                        None => None,
                        Some(s) => {
                            Some(Format::parse(s).ok_or_else(|| DiskError::BackingFormat {
                                path: p.clone(),
                                format: s.to_string(),
                            })?)
                        }
                    };
                    if let Some(policy) = policy {
                        let target = resolve_backing(&p, name);
                        policy.permit(&p, name, &target)?;
                        next = Some((target, bfmt));
                    }
                }
                Layer {
                    backing_name: h.backing_file.clone(),
                    path: p,
                    format: fmt,
                    header: Some(h),
                }
            }
        };
        layers.push(layer);
    }
    Ok(layers)
}

/// Every L2 table the active L1 names must be cluster aligned and inside the file: imago
/// would read a table past the end as zeroes and hide the damage.
fn validate_l1(f: &File, file_len: u64, h: &Header) -> std::result::Result<(), String> {
    let l1 = crate::qcow2::meta::read_table(f, h.l1_table_offset, u64::from(h.l1_size))
        .map_err(|e| format!("reading L1 table: {e}"))?;
    let cs = h.cluster_size();
    for (i, e) in l1.iter().enumerate() {
        let off = e & crate::qcow2::meta::OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            return Err(format!(
                "L1 entry {i}: L2 table offset {off:#x} is not cluster aligned"
            ));
        }
        if off.checked_add(cs).is_none_or(|end| end > file_len) {
            return Err(format!(
                "L1 entry {i}: L2 table at {off:#x} lies past the end of the file ({file_len} bytes)"
            ));
        }
    }
    Ok(())
}

/// Every active L2 entry of the qcow2 image at `path` must name a cluster inside the file.
/// imago reads whatever lies past the end of the file as zeroes, so a truncated image or an
/// entry pointing far past the end would otherwise read back as zeroes, silently (and
/// `convert` would write them out). Bounded by the file: only tables inside it are read.
fn validate_mappings(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(io_err(path))?;
    let meta = Meta::open(f).map_err(corrupt(path))?;
    let cs = meta.header.cluster_size();
    let per_l2 = meta.header.l2_entries();
    for (i, e) in meta.l1.iter().enumerate() {
        let l2_off = e & crate::qcow2::meta::OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let table = meta.l2_table(l2_off).map_err(corrupt(path))?;
        for (j, &entry) in table.iter().enumerate() {
            let guest = (i as u64 * per_l2 + j as u64) * cs;
            if guest >= meta.header.size {
                break;
            }
            meta.decode(entry).map_err(|what| DiskError::Corrupt {
                path: path.to_path_buf(),
                what: format!("guest offset {guest:#x}: {what}"),
            })?;
        }
    }
    Ok(())
}

/// Open an image (raw or qcow2, probed) with its whole backing chain.
///
/// Only the top layer is ever opened writable. Chains with zstd-compressed layers are read
/// through kiln's own reader and can only be opened read-only.
pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Arc<dyn BlockDevice>> {
    let path = path.as_ref();
    let layers = chain(path, opts.format, opts.max_chain_depth, &opts.backing)?;
    for l in layers.iter().filter(|l| l.format == Format::Qcow2) {
        validate_mappings(&l.path)?;
    }
    let zstd = layers.iter().any(|l| {
        l.header
            .as_ref()
            .is_some_and(|h| h.compression_type == CompressionType::Zstd)
    });
    if zstd {
        if !opts.read_only {
            return Err(DiskError::Invalid(format!(
                "{}: writing to a chain with zstd-compressed qcow2 images is not supported; \
                 convert it first",
                path.display()
            )));
        }
        return open_own(&layers);
    }
    if layers.len() == 1 && layers[0].format == Format::Raw {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(io_err(path))?;
        return Ok(Arc::new(
            RawDevice::new(f, opts.read_only).map_err(io_err(path))?,
        ));
    }
    open_imago(&layers, opts.read_only)
}

fn open_imago(layers: &[Layer], read_only: bool) -> Result<Arc<dyn BlockDevice>> {
    let top = open_imago_access(layers, read_only)?;
    Ok(Arc::new(ImagoDevice::new(
        top,
        read_only,
        layers[0].path.clone(),
    )))
}

/// Grow the top qcow2 image through imago (opened without its backing file, which resizing
/// does not read).
pub(crate) fn resize_qcow2(top_layer: &Layer, new_size: u64) -> Result<()> {
    let mut top = open_imago_access(std::slice::from_ref(top_layer), false)?;
    let p = &top_layer.path;
    crate::qcow2::imago_dev::guarded("resize", || {
        top.resize(new_size, imago::format::PreallocateMode::None)?;
        top.flush()?;
        top.sync()
    })
    .map_err(|e| DiskError::Block {
        path: p.clone(),
        source: e,
    })
}

fn open_imago_access(layers: &[Layer], read_only: bool) -> Result<FormatAccess<ImagoFile>> {
    let mut below: Option<FormatAccess<ImagoFile>> = None;
    for (i, layer) in layers.iter().enumerate().rev() {
        let writable = i == 0 && !read_only;
        let p = &layer.path;
        let wrap = |e: crate::BlockError| DiskError::Block {
            path: p.clone(),
            source: e,
        };
        let access = crate::qcow2::imago_dev::guarded("open", || match layer.format {
            Format::Raw => Ok(FormatAccess::new(Raw::<ImagoFile>::open_path(p, writable)?)),
            Format::Qcow2 => {
                let mut q = Qcow2::<ImagoFile>::open_path(p, writable)?;
                q.set_data_file(None);
                q.set_backing(below.take());
                Ok(FormatAccess::new(q))
            }
        })
        .map_err(wrap)?;
        below = Some(access);
    }
    below.ok_or_else(|| DiskError::Invalid("empty chain".into()))
}

fn open_own(layers: &[Layer]) -> Result<Arc<dyn BlockDevice>> {
    let mut below: Option<Arc<dyn BlockDevice>> = None;
    for layer in layers.iter().rev() {
        let p = &layer.path;
        let f = File::open(p).map_err(io_err(p))?;
        let dev: Arc<dyn BlockDevice> = match layer.format {
            Format::Raw => Arc::new(RawDevice::new(f, true).map_err(io_err(p))?),
            Format::Qcow2 => {
                let meta = Meta::open(f).map_err(corrupt(p))?;
                Arc::new(Qcow2Reader::new(meta, below.take()))
            }
        };
        below = Some(dev);
    }
    below.ok_or_else(|| DiskError::Invalid("empty chain".into()))
}

/// Own reader with a chain depth limit (the fuzz entry uses depth 1).
pub(crate) fn open_own_limited(path: &str, depth: usize) -> Result<Arc<dyn BlockDevice>> {
    open_own(&chain(
        Path::new(path),
        None,
        depth,
        &BackingPolicy::Follow,
    )?)
}

/// Open through kiln's own reader regardless of compression (read-only, following backing
/// files: for kiln's own chains); tests use it as a second, independent implementation.
pub fn open_with_own_reader(path: impl AsRef<Path>) -> Result<Arc<dyn BlockDevice>> {
    open_own(&chain(
        path.as_ref(),
        None,
        MAX_CHAIN_DEPTH,
        &BackingPolicy::Follow,
    )?)
}
