//! Clones: copy-on-write instances of a module. `<clones>/<name>/clone.yaml` names the module
//! and each VM's disks; `disks/<vm>-<disk>.qcow2` are overlays on the module's captured
//! disks, so a clone costs almost no space and the module stays untouched.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diskops;
use crate::job::BaseView;
use crate::module::{self, ModuleError, ModuleRecord};
use crate::pipeline::BASE_FILE;

pub const CLONE_FILE: &str = "clone.yaml";
/// The module file [`load_base`] reads.
pub const BASE_FILE_NAME: &str = BASE_FILE;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneRecord {
    pub name: String,
    pub module: String,
    /// The module folder (absolute).
    pub module_path: PathBuf,
    pub vms: Vec<CloneVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneVm {
    pub name: String,
    /// Overlay files, relative to the clone folder, boot disk first.
    pub disks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("clone `{0}` already exists")]
    Exists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(#[from] diskops::DiskOpError),
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

/// Makes `count` clones named `<prefix>-<n>` (n from 1, skipping names in use).
pub fn create(
    module_dir: &Path,
    rec: &ModuleRecord,
    clones: &Path,
    prefix: &str,
    count: u32,
) -> Result<Vec<PathBuf>, CloneError> {
    module::check_name(prefix)?;
    fs::create_dir_all(clones).map_err(|source| CloneError::Io {
        what: "creating",
        path: clones.to_path_buf(),
        source,
    })?;
    let module_dir = fs::canonicalize(module_dir).map_err(|source| CloneError::Io {
        what: "resolving",
        path: module_dir.to_path_buf(),
        source,
    })?;
    let mut made = Vec::new();
    let mut n = 1u32;
    while made.len() < count as usize {
        let name = format!("{prefix}-{n}");
        n += 1;
        let dst = clones.join(&name);
        if dst.exists() {
            continue;
        }
        let tmp = clones.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| CloneError::Io { what, path, source }
        };
        fs::create_dir_all(tmp.join("disks")).map_err(io("creating", &tmp))?;
        let mut vms = Vec::new();
        let r = (|| -> Result<(), CloneError> {
            for vm in &rec.vms {
                let mut disks = Vec::new();
                for d in &vm.disks {
                    let base = module_dir.join(&d.file);
                    let rel = format!("disks/{}-{}.qcow2", vm.name, d.name);
                    diskops::create_overlay(
                        Some((&base, diskops::ImageFormat::Qcow2)),
                        &tmp.join(&rel),
                        d.virtual_size,
                    )?;
                    disks.push(rel);
                }
                vms.push(CloneVm {
                    name: vm.name.clone(),
                    disks,
                });
            }
            let c = CloneRecord {
                name: name.clone(),
                module: rec.name.clone(),
                module_path: module_dir.clone(),
                vms,
            };
            let y = serde_saphyr::to_string(&c).map_err(|e| CloneError::Bad {
                path: tmp.join(CLONE_FILE),
                reason: e.to_string(),
            })?;
            fs::write(tmp.join(CLONE_FILE), y).map_err(io("writing", &tmp))?;
            fs::rename(&tmp, &dst).map_err(io("renaming into", &dst))?;
            Ok(())
        })();
        if let Err(e) = r {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        made.push(dst);
    }
    Ok(made)
}

pub fn load(dir: &Path) -> Result<CloneRecord, CloneError> {
    let p = dir.join(CLONE_FILE);
    let text = fs::read_to_string(&p).map_err(|source| CloneError::Io {
        what: "reading",
        path: p.clone(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| CloneError::Bad {
        path: p,
        reason: e.to_string(),
    })
}

/// What clones of the module at `module_dir` inherit: the base network, NICs and resources
/// (`base.yaml`, written by the build). `None` for a module built before kiln recorded it:
/// its clones get no network.
pub fn load_base(module_dir: &Path) -> Result<Option<BaseView>, CloneError> {
    let p = module_dir.join(BASE_FILE);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CloneError::Io {
                what: "reading",
                path: p,
                source,
            })
        }
    };
    serde_saphyr::from_str(&text)
        .map(Some)
        .map_err(|e| CloneError::Bad {
            path: p,
            reason: e.to_string(),
        })
}

/// Every clone in `clones`.
pub fn list(clones: &Path) -> Result<Vec<(PathBuf, CloneRecord)>, CloneError> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(clones) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let p = e.path();
        if !e.file_name().to_string_lossy().starts_with('.') && p.join(CLONE_FILE).is_file() {
            if let Ok(c) = load(&p) {
                out.push((p, c));
            }
        }
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(out)
}
