//! What an ISO install adds to a build VM, for the build only and never captured: its `isos`
//! as CD-ROMs (fetched into the cache at the build's start), a floppy made from `files`, and
//! a screen for the boot command.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::vm::VmBuild;
use crate::cache::Cache;
use crate::engine::Peripherals;
use crate::job::{FileContent, VmJob};
use crate::sources::url::{fetch_bytes, FileFetchError};

/// Why a VM's CD-ROMs or floppy could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("ISO {url} is not in the cache (sha256:{sha256}), though it was fetched at the build's start")]
    IsoGone { url: String, sha256: String },
    #[error("floppy: no file named `{0}` in `files`")]
    NoFile(String),
    #[error("floppy: file `{name}`: {source}")]
    Read {
        name: String,
        #[source]
        source: FileFetchError,
    },
    #[error("making the floppy {}: {source}", path.display())]
    Floppy {
        path: PathBuf,
        #[source]
        source: kiln_disk::DiskError,
    },
    #[error("creating {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the VM gets a screen: a boot command types into it, and an installer shows it.
pub(super) fn wants_screen(vm: &VmJob) -> bool {
    !vm.isos.is_empty() || !vm.boot_command.is_empty()
}

/// Whether the VM needs what only the qemu engine has (CD-ROMs, a floppy, a screen), and why.
pub(super) fn kvm_refusal(vm: &VmJob) -> Option<String> {
    let what = if !vm.isos.is_empty() {
        "ISOs (CD-ROMs)"
    } else if !vm.floppy_files.is_empty() {
        "a floppy"
    } else if !vm.boot_command.is_empty() {
        "a boot command (a screen and keyboard)"
    } else {
        return None;
    };
    Some(format!(
        "VM `{}` has {what}, which the kvm engine (kiln-vmm) does not offer",
        vm.name
    ))
}

/// The VM's CD-ROMs, floppy and screen. The ISOs' digests are the ones the build's start
/// fetched them under; the floppy is made in the VM's runtime folder, readable only by kiln.
pub(super) fn peripherals(b: &VmBuild) -> Result<Peripherals, MediaError> {
    let cache = &b.module.opts.cache;
    let mut cdroms = Vec::new();
    for iso in &b.vm.isos {
        let sha256 = iso.sha256.clone().unwrap_or_default();
        let path = cache.blob(&sha256).ok_or_else(|| MediaError::IsoGone {
            url: iso.url.clone(),
            sha256: sha256.clone(),
        })?;
        cdroms.push(path);
    }
    let floppy = if b.vm.floppy_files.is_empty() {
        None
    } else {
        Some(make_floppy(
            &b.runtime_dir(),
            &b.vm.floppy_files,
            &b.module.job.files,
            cache,
        )?)
    };
    Ok(Peripherals {
        cdroms,
        floppy,
        screen: wants_screen(b.vm),
    })
}

/// Makes `dir/floppy.img` from the `files` entries `names`, with their content as file steps
/// read it (inline, or the URL's download); readable only by kiln (0600).
fn make_floppy(
    dir: &Path,
    names: &[String],
    files: &BTreeMap<String, FileContent>,
    cache: &Cache,
) -> Result<PathBuf, MediaError> {
    fs::create_dir_all(dir).map_err(|source| MediaError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for name in names {
        let read = |source| MediaError::Read {
            name: name.clone(),
            source,
        };
        let data = match files.get(name) {
            None => return Err(MediaError::NoFile(name.clone())),
            Some(FileContent::Inline(s)) => s.clone().into_bytes(),
            Some(FileContent::Url(u)) => fetch_bytes(cache, u).map_err(read)?,
            Some(FileContent::Cached { url, path }) => fs::read(path).map_err(|source| {
                read(FileFetchError::Prefetched {
                    url: url.clone(),
                    path: path.clone(),
                    source,
                })
            })?,
        };
        out.push(kiln_disk::FatFile::new(name.clone(), data));
    }
    let path = dir.join("floppy.img");
    // Written through a private temporary file (0600) and renamed into place.
    kiln_disk::create_floppy(&path, "KILN", &out).map_err(|source| MediaError::Floppy {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    #[test]
    fn the_floppy_holds_the_named_files_and_only_kiln_reads_it() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let blob = d.path().join("fetched");
        fs::write(&blob, b"<unattend/>").unwrap();
        let mut files = crate::build::inline_files(&[("ks.cfg", "rootpw kiln\n"), ("other", "x")]);
        files.insert(
            "Autounattend.xml".into(),
            FileContent::Cached {
                url: "http://127.0.0.1:1/a.xml".into(),
                path: blob,
            },
        );
        let names = vec!["ks.cfg".to_string(), "Autounattend.xml".to_string()];
        let run = d.path().join("run/vm");
        let img = make_floppy(&run, &names, &files, &cache).unwrap();
        let meta = fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), kiln_disk::FLOPPY_SIZE);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Read back with mtools, as a guest's FAT driver would.
        match Command::new("mtype")
            .arg("-i")
            .arg(&img)
            .arg("::Autounattend.xml")
            .output()
        {
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(out.stdout, b"<unattend/>");
                let ls = Command::new("mdir")
                    .arg("-i")
                    .arg(&img)
                    .arg("-b")
                    .arg("::")
                    .output()
                    .unwrap();
                let ls = String::from_utf8_lossy(&ls.stdout).to_lowercase();
                assert!(ls.contains("ks.cfg") && !ls.contains("other"), "{ls}");
            }
            Err(e) => eprintln!("SKIP reading the floppy back: mtype (package mtools): {e}"),
        }
        // A name `files` does not have is named.
        let e = make_floppy(&run, &["nope".into()], &files, &cache).unwrap_err();
        assert_eq!(e.to_string(), "floppy: no file named `nope` in `files`");
    }
}
