//! A UEFI VM's NVRAM (its firmware's variable store, one file per VM): the file a VM starts
//! from (a copy of the NVRAM a module captured, or the firmware's blank template), and its
//! capture into the module as `nvram/<vm>.fd`.
//!
//! A module's record and files are untrusted input: the NVRAM path it names must stay inside
//! the module folder, the file must be no larger than a variable store can be, and its bytes
//! must match the recorded SHA-256. Each copy is checked on the bytes it writes (read once,
//! hashed, written), so a file changed between the check and the copy cannot slip through.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::cache::sha256_bytes;
use crate::module::FirmwareRecord;
use crate::path_io::PathIoError;

/// The module's (and a clone's) folder of NVRAM files.
pub const NVRAM_DIR: &str = "nvram";
/// OVMF's 4 MiB variable store is 540672 bytes; a file far larger is not one.
pub const MAX_NVRAM_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NvramError {
    #[error(
        "{}: VM `{vm}` names its NVRAM as `{path}`, which {reason}; refusing it",
        record.display()
    )]
    BadPath {
        record: PathBuf,
        vm: String,
        path: String,
        reason: &'static str,
    },
    #[error(
        "{}: VM `{vm}` was built booting through {firmware} firmware, but the module records \
         no NVRAM file for it: rebuild the module",
        record.display()
    )]
    NotRecorded {
        record: PathBuf,
        vm: String,
        firmware: &'static str,
    },
    #[error(
        "{}: VM `{vm}` records its NVRAM without a sha256, so it cannot be checked: rebuild \
         the module",
        record.display()
    )]
    NoDigest { record: PathBuf, vm: String },
    #[error("the NVRAM file {} cannot be read: {source}", path.display())]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the NVRAM file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "the NVRAM file {} is {size} bytes, more than a variable store can be ({} bytes)",
        path.display(),
        MAX_NVRAM_BYTES
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "the NVRAM file {} has sha256 {found}, but the module records {expected}: it was \
         changed after capture; refusing to boot from it",
        path.display()
    )]
    Changed {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("`{0}` cannot name an NVRAM file (not a VM name)")]
    VmName(String),
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// A captured NVRAM a VM starts from: a parent module's (`buildRef`) or a clone's module's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentNvram {
    /// Inside the module folder (checked).
    pub path: PathBuf,
    /// As the module's record has it.
    pub sha256: String,
}

/// The NVRAM `fw` records for VM `vm` of the module at `module_dir`, checked to be a file
/// inside that folder. `None` when the firmware keeps no variables (BIOS), or when the build
/// booted directly and captured none; an error when a firmware boot recorded none.
pub fn recorded(
    module_dir: &Path,
    vm: &str,
    fw: &FirmwareRecord,
) -> Result<Option<ParentNvram>, NvramError> {
    let record = module_dir.join(crate::module::MODULE_FILE);
    if !fw.firmware.has_nvram() {
        return Ok(None);
    }
    let Some(rel) = &fw.nvram else {
        if fw.booted {
            return Err(NvramError::NotRecorded {
                record,
                vm: vm.into(),
                firmware: fw.firmware.as_str(),
            });
        }
        return Ok(None);
    };
    let bad = |reason| NvramError::BadPath {
        record: record.clone(),
        vm: vm.into(),
        path: rel.clone(),
        reason,
    };
    let p = Path::new(rel);
    if p.is_absolute() {
        return Err(bad("is absolute"));
    }
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("is not a plain path inside the module folder"));
    }
    let sha256 = fw
        .nvram_sha256
        .clone()
        .ok_or_else(|| NvramError::NoDigest {
            record: record.clone(),
            vm: vm.into(),
        })?;
    let path = module_dir.join(p);
    // A symbolic link along the way could still lead out of the folder.
    let real = fs::canonicalize(&path).map_err(|source| NvramError::Missing {
        path: path.clone(),
        source,
    })?;
    let root = fs::canonicalize(module_dir).map_err(PathIoError::at("resolving", module_dir))?;
    if !real.starts_with(&root) {
        return Err(bad("leads outside the module folder"));
    }
    Ok(Some(ParentNvram { path, sha256 }))
}

/// Gives a VM its NVRAM at `dest` (0600): a copy of `parent` (checked against its recorded
/// SHA-256) when the VM inherits one, else of the firmware's blank `template`.
pub fn start_nvram(
    dest: &Path,
    parent: Option<&ParentNvram>,
    template: &Path,
) -> Result<(), NvramError> {
    match parent {
        Some(p) => copy_parent(p, dest),
        None => write_private(dest, &read_bounded(template)?),
    }
}

/// Copies a captured NVRAM to `dest` (0600), refusing it unless its bytes are the recorded
/// ones.
pub fn copy_parent(parent: &ParentNvram, dest: &Path) -> Result<(), NvramError> {
    let bytes = read_bounded(&parent.path)?;
    let found = sha256_bytes(&bytes);
    if !found.eq_ignore_ascii_case(&parent.sha256) {
        return Err(NvramError::Changed {
            path: parent.path.clone(),
            expected: parent.sha256.clone(),
            found,
        });
    }
    write_private(dest, &bytes)
}

/// Captures VM `vm`'s NVRAM `from` into the module folder as `nvram/<vm>.fd` (whole or not at
/// all), returning that relative path and the file's SHA-256 for the module's record.
pub fn capture_nvram(
    module_dir: &Path,
    vm: &str,
    from: &Path,
) -> Result<(String, String), NvramError> {
    crate::module::check_name(vm).map_err(|_| NvramError::VmName(vm.into()))?;
    let bytes = read_bounded(from)?;
    let rel = format!("{NVRAM_DIR}/{vm}.fd");
    let dir = module_dir.join(NVRAM_DIR);
    fs::create_dir_all(&dir).map_err(PathIoError::at("creating", &dir))?;
    write_private(&module_dir.join(&rel), &bytes)?;
    Ok((rel, sha256_bytes(&bytes)))
}

/// The file's bytes, refusing what is not a regular file or larger than a variable store.
fn read_bounded(path: &Path) -> Result<Vec<u8>, NvramError> {
    let missing = |source| NvramError::Missing {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(missing)?;
    let meta = f.metadata().map_err(missing)?;
    if !meta.is_file() {
        return Err(NvramError::NotAFile { path: path.into() });
    }
    let too_large = |size| NvramError::TooLarge {
        path: path.into(),
        size,
    };
    if meta.len() > MAX_NVRAM_BYTES {
        return Err(too_large(meta.len()));
    }
    // The file may grow after the size check: read no more than the bound allows.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_NVRAM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(missing)?;
    if bytes.len() as u64 > MAX_NVRAM_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Writes `bytes` to `dest`, mode 0600 (the guest may keep secrets in its variables), through
/// a temporary file renamed into place, so `dest` is never half written.
fn write_private(dest: &Path, bytes: &[u8]) -> Result<(), NvramError> {
    let name = dest
        .file_name()
        .map_or_else(|| "nvram".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let r = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    r.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PathIoError::new("writing", dest, e).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Firmware;
    use std::os::unix::fs::PermissionsExt;

    /// A variable store's size, with recognisable bytes.
    fn vars(tag: u8) -> Vec<u8> {
        let mut v = vec![0xffu8; 540_672];
        v[..4].copy_from_slice(&[tag; 4]);
        v
    }

    fn record(nvram: Option<&str>, sha: Option<String>) -> FirmwareRecord {
        FirmwareRecord {
            firmware: Firmware::Uefi,
            booted: true,
            nvram: nvram.map(String::from),
            nvram_sha256: sha,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn capture_then_start_from_it_or_from_the_template() {
        let d = tempfile::tempdir().unwrap();
        let (module, work) = (d.path().join("m"), d.path().join("work"));
        fs::create_dir_all(&module).unwrap();
        fs::create_dir_all(&work).unwrap();
        let live = work.join("web.fd");
        fs::write(&live, vars(1)).unwrap();

        let (rel, sha) = capture_nvram(&module, "web", &live).unwrap();
        assert_eq!(rel, "nvram/web.fd");
        assert_eq!(sha, sha256_bytes(&vars(1)));
        assert_eq!(fs::read(module.join(&rel)).unwrap(), vars(1));
        assert_eq!(mode(&module.join(&rel)), 0o600);
        // Captured again (a rebuild): replaced whole, no temporary left behind.
        fs::write(&live, vars(2)).unwrap();
        let (_, sha2) = capture_nvram(&module, "web", &live).unwrap();
        assert_eq!(sha2, sha256_bytes(&vars(2)));
        assert_eq!(fs::read_dir(module.join(NVRAM_DIR)).unwrap().count(), 1);

        let parent = recorded(&module, "web", &record(Some(&rel), Some(sha2)))
            .unwrap()
            .expect("a UEFI record with its NVRAM");
        let template = work.join("OVMF_VARS_4M.fd");
        fs::write(&template, vars(0)).unwrap();
        let child = work.join("child.fd");
        start_nvram(&child, Some(&parent), &template).unwrap();
        assert_eq!(fs::read(&child).unwrap(), vars(2));
        assert_eq!(mode(&child), 0o600);
        let blank = work.join("blank.fd");
        start_nvram(&blank, None, &template).unwrap();
        assert_eq!(fs::read(&blank).unwrap(), vars(0));
        assert_eq!(mode(&blank), 0o600);

        assert!(matches!(
            capture_nvram(&module, "../web", &live),
            Err(NvramError::VmName(_))
        ));
    }

    #[test]
    fn a_changed_oversized_or_missing_nvram_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("vars.fd");
        fs::write(&src, vars(1)).unwrap();
        let dest = d.path().join("out.fd");
        let p = ParentNvram {
            path: src.clone(),
            sha256: sha256_bytes(&vars(2)),
        };
        let e = copy_parent(&p, &dest).unwrap_err();
        assert!(matches!(e, NvramError::Changed { .. }), "{e}");
        assert!(e.to_string().contains(&p.sha256), "{e}");
        assert!(!dest.exists(), "nothing is written from a changed file");

        let big = d.path().join("big.fd");
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_NVRAM_BYTES + 1)
            .unwrap();
        let e = start_nvram(&dest, None, &big).unwrap_err();
        assert!(matches!(e, NvramError::TooLarge { .. }), "{e}");

        let gone = d.path().join("gone.fd");
        let e = start_nvram(&dest, None, &gone).unwrap_err();
        assert!(e.to_string().contains(&*gone.to_string_lossy()), "{e}");
        let e = start_nvram(&dest, None, d.path()).unwrap_err();
        assert!(matches!(e, NvramError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn a_record_naming_a_file_outside_the_module_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let module = d.path().join("m");
        fs::create_dir_all(module.join(NVRAM_DIR)).unwrap();
        fs::write(d.path().join("outside.fd"), vars(1)).unwrap();
        let sha = Some(sha256_bytes(&vars(1)));
        for bad in [
            "../outside.fd",
            "nvram/../../outside.fd",
            "/etc/passwd",
            "./nvram/web.fd",
            "",
        ] {
            let e = recorded(&module, "web", &record(Some(bad), sha.clone())).unwrap_err();
            assert!(matches!(e, NvramError::BadPath { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("VM `web`"), "{e}");
        }
        std::os::unix::fs::symlink("../../outside.fd", module.join("nvram/web.fd")).unwrap();
        let e = recorded(&module, "web", &record(Some("nvram/web.fd"), sha.clone())).unwrap_err();
        assert!(e.to_string().contains("outside the module folder"), "{e}");

        // A firmware boot with no NVRAM, an NVRAM without its digest, a file that is gone.
        let e = recorded(&module, "web", &record(None, None)).unwrap_err();
        assert!(matches!(e, NvramError::NotRecorded { .. }), "{e}");
        let e = recorded(&module, "web", &record(Some("nvram/web.fd"), None)).unwrap_err();
        assert!(matches!(e, NvramError::NoDigest { .. }), "{e}");
        let e = recorded(&module, "web", &record(Some("nvram/db.fd"), sha)).unwrap_err();
        assert!(
            matches!(e, NvramError::Missing { .. }) && e.to_string().contains("nvram/db.fd"),
            "{e}"
        );
        // BIOS keeps no variables; a direct build captured none.
        let bios = FirmwareRecord {
            firmware: Firmware::Bios,
            ..record(Some("/etc/passwd"), None)
        };
        assert_eq!(recorded(&module, "web", &bios).unwrap(), None);
        let direct = FirmwareRecord {
            booted: false,
            ..record(None, None)
        };
        assert_eq!(recorded(&module, "web", &direct).unwrap(), None);
    }
}
