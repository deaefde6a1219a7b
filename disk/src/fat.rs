//! Small FAT images built from a set of files: the cloud-init NoCloud seed (`cidata`) and
//! 1.44 MB floppies.
//!
//! Formatting and file writing are hadris-fat's (its output passes `fsck.fat`; the `fatfs`
//! crate's did not in the project's crate check). kiln only picks the geometry, checks names
//! and sizes up front, and writes the image atomically.

use std::io::Cursor;
use std::path::Path;

use hadris_fat::sync::format::{FatFormatOptions, FatTypeSelection, FatVolumeFormatter, MediaType};
use hadris_fat::sync::FatVolumeWriteExt;

use crate::error::{io_err, DiskError, Result};

/// Size of a 1.44 MB floppy.
pub const FLOPPY_SIZE: u64 = 1_474_560;

/// One file to put in the root directory.
#[derive(Debug, Clone)]
pub struct FatFile {
    /// File name (long names are kept through VFAT entries).
    pub name: String,
    pub data: Vec<u8>,
}

impl FatFile {
    pub fn new(name: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        FatFile {
            name: name.into(),
            data: data.into(),
        }
    }
}

fn fat_err(what: &str) -> impl FnOnce(hadris_fat::Error) -> DiskError + '_ {
    move |e| DiskError::Invalid(format!("FAT image: {what}: {e:?}"))
}

fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c.is_control() || "/\\:*?\"<>|".contains(c));
    if bad {
        return Err(DiskError::Invalid(format!(
            "FAT image: invalid file name {name:?}"
        )));
    }
    Ok(())
}

/// Build a FAT image of `size` bytes in memory with `label` and `files` in its root.
pub fn build_fat(size: u64, label: &str, files: &[FatFile], floppy: bool) -> Result<Vec<u8>> {
    if label.is_empty() || label.len() > 11 || !label.is_ascii() {
        return Err(DiskError::Invalid(format!(
            "FAT label {label:?} must be 1-11 ASCII characters"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for f in files {
        check_name(&f.name)?;
        if !seen.insert(f.name.to_ascii_lowercase()) {
            return Err(DiskError::Invalid(format!(
                "FAT image: duplicate file name {:?}",
                f.name
            )));
        }
        total += (f.data.len() as u64).next_multiple_of(512);
    }
    // FAT, root directory and boot sector take a little room; refuse early with a clear
    // message instead of failing midway.
    if total + 64 * 1024 > size {
        return Err(DiskError::Invalid(format!(
            "FAT image: {total} bytes of files do not fit in a {size}-byte image"
        )));
    }
    let mut image = vec![0u8; size as usize];
    {
        let mut opts = FatFormatOptions::new(size)
            .volume_label(label)
            .fat_type(FatTypeSelection::Fat12);
        if floppy {
            opts = opts.sectors_per_cluster(1).media_type(MediaType::Removable);
            opts.root_entry_count = 224;
        } else {
            // 4 KiB clusters keep FAT12 under its 4084-cluster limit up to ~16 MiB (a seed
            // carrying the agent binary is a few MiB; 512-byte clusters stop at ~2 MiB).
            opts = opts.sectors_per_cluster(8);
        }
        let fs = FatVolumeFormatter::format(Cursor::new(&mut image[..]), opts)
            .map_err(fat_err("format"))?;
        let root = fs.root_dir();
        for f in files {
            let entry = fs.create_file(&root, &f.name).map_err(fat_err(&f.name))?;
            let mut w = fs.write_file(&entry).map_err(fat_err(&f.name))?;
            let mut done = 0;
            while done < f.data.len() {
                let n = w.write(&f.data[done..]).map_err(fat_err(&f.name))?;
                if n == 0 {
                    return Err(DiskError::Invalid(format!(
                        "FAT image: no room for {}",
                        f.name
                    )));
                }
                done += n;
            }
            w.finish().map_err(fat_err(&f.name))?;
        }
    }
    Ok(image)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-fat-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| DiskError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Write a FAT image file sized to hold `files` (at least 1 MiB).
pub fn create_fat_image(path: impl AsRef<Path>, label: &str, files: &[FatFile]) -> Result<()> {
    let data: u64 = files
        .iter()
        .map(|f| (f.data.len() as u64).next_multiple_of(4096))
        .sum();
    // FAT12 tops out near 16 MiB (4084 clusters of 4 KiB).
    let size = (data + data / 8 + (512 << 10))
        .next_multiple_of(512 << 10)
        .max(1 << 20);
    if size > 15 << 20 {
        return Err(DiskError::Invalid(format!(
            "FAT image: {data} bytes of files is too much (max ~14 MiB)"
        )));
    }
    write_atomic(path.as_ref(), &build_fat(size, label, files, false)?)
}

/// A cloud-init NoCloud seed: label `cidata` with `user-data`, `meta-data` and, when given,
/// `network-config`.
pub fn create_cidata(
    path: impl AsRef<Path>,
    user_data: &[u8],
    meta_data: &[u8],
    network_config: Option<&[u8]>,
) -> Result<()> {
    let mut files = vec![
        FatFile::new("user-data", user_data),
        FatFile::new("meta-data", meta_data),
    ];
    if let Some(n) = network_config {
        files.push(FatFile::new("network-config", n));
    }
    create_fat_image(path, "cidata", &files)
}

/// A 1.44 MB FAT12 floppy holding `files` (long names kept).
pub fn create_floppy(path: impl AsRef<Path>, label: &str, files: &[FatFile]) -> Result<()> {
    write_atomic(path.as_ref(), &build_fat(FLOPPY_SIZE, label, files, true)?)
}
