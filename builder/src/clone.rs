//! Clones: copy-on-write instances of a module. `<clones>/<name>/clone.yaml` names the module
//! and each VM's disks; `disks/<vm>-<disk>.qcow2` are overlays on the module's captured
//! disks, so a clone costs almost no space and the module stays untouched.
//!
//! A clone keeps its module as it was: `base/<module>/` holds hard links to the module's
//! files (disks, kernels, `module.yaml`, `base.yaml`; no space used) and the overlays back
//! onto those links by a relative name, so a module rebuilt with `--force` or removed leaves
//! its clones reading the disks they were made from. A thin module's parent layers are
//! linked too, at `base/<parent>/...`, so the relative names inside the chain still resolve.
//! Where hard links cannot be made (another file system, a file owned by someone else), the
//! overlays back onto the module's own files, as before.
//!
//! A VM whose module was built booting through UEFI firmware gets its own copy of the
//! module's captured NVRAM (`nvram/<vm>.fd`, 0600), made with the clone and checked against
//! the module's record, so the variables the build wrote (boot entries) are there and the
//! clone's own writes never reach the module.
//!
//! Either way `clone.yaml` records each base disk's SHA-256 (the module's record of it) and
//! its device, inode, size and modification time; [`verify_bases`] refuses a base that is no
//! longer the one the clone was made on, and hashes only when those identifiers changed.

use crate::path_io::PathIoError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diskops;
use crate::engine::{BootMode, FirmwareBoot};
use crate::job::BaseView;
use crate::module::{self, ModuleError, ModuleRecord, VmRecord};
use crate::nvram::{self, NvramError};
use crate::sources::BootFiles;

pub const CLONE_FILE: &str = "clone.yaml";
/// The module file [`load_base`] reads.
pub const BASE_FILE_NAME: &str = module::BASE_FILE;
/// The folder of a clone holding hard links to its module's files.
const SNAPSHOT_DIR: &str = "base";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneRecord {
    pub name: String,
    pub module: String,
    /// The module folder (absolute) the clone was made from.
    pub module_path: PathBuf,
    /// The module as it was when cloned (hard links), relative to the clone folder; absent
    /// when links could not be made, or for clones made before kiln kept them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PathBuf>,
    pub vms: Vec<CloneVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneVm {
    pub name: String,
    /// Overlay files, relative to the clone folder, boot disk first.
    pub disks: Vec<String>,
    /// The disk under each overlay, in the same order (absent for clones made before kiln
    /// recorded them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<BaseDisk>,
    /// UEFI: the VM's own NVRAM, relative to the clone folder (a copy of the module's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<String>,
}

/// The disk an overlay was made on, and how to tell it is still the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseDisk {
    /// The module's disk name.
    pub name: String,
    /// Relative to the clone folder (its hard link), or absolute (the module's file).
    pub path: PathBuf,
    /// From `module.yaml`.
    pub sha256: String,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
}

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("clone `{0}` already exists")]
    Exists(String),
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error("{0}")]
    Disk(#[from] diskops::DiskOpError),
    #[error("creating the overlay {path}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: kiln_disk::DiskError,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error(
        "clone `{clone}`: VM `{vm}` disk `{disk}` was made over {}, which cannot be read; \
         its module was removed or rebuilt since: remove the clone (kiln rm --clone {clone}) \
         and clone the module again",
        path.display()
    )]
    BaseMissing {
        clone: String,
        vm: String,
        disk: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    BaseChanged(Box<BaseChanged>),
    #[error("VM `{vm}`: {source}")]
    Nvram {
        vm: String,
        #[source]
        source: NvramError,
    },
    #[error(
        "clone `{clone}`: VM `{vm}` boots through {firmware} firmware, but its own NVRAM {} \
         cannot be used ({reason}): remove the clone (kiln rm --clone {clone}) and clone the \
         module again",
        path.display()
    )]
    NvramMissing {
        clone: String,
        vm: String,
        firmware: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("module VM `{0}` has no kernel recorded and was not built booting through firmware")]
    NoBoot(String),
}

/// A clone's base disk whose bytes are not the ones it was made on.
#[derive(Debug, thiserror::Error)]
#[error(
    "clone `{clone}`: VM `{vm}` disk `{disk}` was made over {} with sha256 {expected}, \
     which now has sha256 {found}: its module was rebuilt or changed since, and the \
     clone's overlay would read another disk under its own writes. Restore the module \
     as it was, or remove the clone (kiln rm --clone {clone}) and clone the module again",
    path.display()
)]
pub struct BaseChanged {
    pub clone: String,
    pub vm: String,
    pub disk: String,
    pub path: PathBuf,
    pub expected: String,
    pub found: String,
}

/// Where a clone's module files are: its own links, else the module folder.
pub fn module_dir(clone_dir: &Path, c: &CloneRecord) -> PathBuf {
    match &c.snapshot {
        Some(s) => clone_dir.join(s),
        None => c.module_path.clone(),
    }
}

/// Hard-links the module's files (all but `logs/` and `work/`) into `dst`, and every lower
/// layer of its thin disks at the same place relative to `root` (the modules folder).
fn link_snapshot(
    module_dir: &Path,
    rec: &ModuleRecord,
    root: &Path,
    base: &Path,
    dst: &Path,
) -> Result<(), String> {
    fn link_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<(), String> {
        fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
        let rd = fs::read_dir(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("reading {}: {e}", from.display()))?;
            let name = e.file_name();
            if skip.iter().any(|s| name == *s) {
                continue;
            }
            let (f, t) = (e.path(), to.join(&name));
            let ft = e.file_type().map_err(|e| format!("{}: {e}", f.display()))?;
            if ft.is_dir() {
                link_tree(&f, &t, &[])?;
            } else if ft.is_file() {
                fs::hard_link(&f, &t)
                    .map_err(|e| format!("linking {} to {}: {e}", f.display(), t.display()))?;
            }
        }
        Ok(())
    }
    link_tree(module_dir, dst, &["logs", "work"])?;
    // A thin disk's lower layers, found through the headers (their relative names must
    // resolve the same from the links).
    for vm in &rec.vms {
        for d in vm.disks.iter().filter(|d| d.backing.is_some()) {
            let top = module_dir.join(&d.file);
            let layers = kiln_disk::chain(
                &top,
                None,
                kiln_disk::MAX_CHAIN_DEPTH,
                &kiln_disk::BackingPolicy::Follow,
            )
            .map_err(|e| format!("{}: {e}", top.display()))?;
            for l in layers.iter().skip(1) {
                let real = fs::canonicalize(&l.path)
                    .map_err(|e| format!("resolving {}: {e}", l.path.display()))?;
                let rel = real.strip_prefix(root).map_err(|_| {
                    format!(
                        "{} (under {}) is outside the modules folder {}",
                        real.display(),
                        top.display(),
                        root.display()
                    )
                })?;
                let t = base.join(rel);
                if t.exists() {
                    continue;
                }
                if let Some(p) = t.parent() {
                    fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
                }
                fs::hard_link(&real, &t)
                    .map_err(|e| format!("linking {} to {}: {e}", real.display(), t.display()))?;
            }
        }
    }
    Ok(())
}

fn identity(path: &Path) -> std::io::Result<(u64, u64, u64, i128)> {
    let m = fs::metadata(path)?;
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    Ok((m.size(), m.dev(), m.ino(), mtime))
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
    fs::create_dir_all(clones).map_err(PathIoError::at("creating", clones))?;
    let module_dir =
        fs::canonicalize(module_dir).map_err(PathIoError::at("resolving", module_dir))?;
    let root = module_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let module_folder = module_dir
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(&rec.name));
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
        fs::create_dir_all(tmp.join("disks")).map_err(PathIoError::at("creating", &tmp))?;
        let r = (|| -> Result<(), CloneError> {
            let base = tmp.join(SNAPSHOT_DIR);
            let snap_rel = Path::new(SNAPSHOT_DIR).join(&module_folder);
            let snapshot = match link_snapshot(&module_dir, rec, &root, &base, &tmp.join(&snap_rel))
            {
                Ok(()) => Some(snap_rel),
                Err(why) => {
                    let _ = fs::remove_dir_all(&base);
                    tracing::warn!(
                        "clone `{name}`: cannot link the module's files ({why}); its disks \
                         back onto {} directly, so replacing or removing the module will \
                         make the clone unusable",
                        module_dir.display()
                    );
                    None
                }
            };
            let mut vms = Vec::new();
            for vm in &rec.vms {
                let mut disks = Vec::new();
                let mut bases = Vec::new();
                for d in &vm.disks {
                    let rel = format!("disks/{}-{}.qcow2", vm.name, d.name);
                    let out = tmp.join(&rel);
                    // The overlay names its base relative to `disks/` when it is the clone's
                    // own link (the folder is renamed into place after), else absolutely.
                    let (backing, recorded) = match &snapshot {
                        Some(s) => {
                            let b = s.join(&d.file);
                            (Path::new("..").join(&b), b)
                        }
                        None => {
                            let b = module_dir.join(&d.file);
                            (b.clone(), b)
                        }
                    };
                    kiln_disk::create_overlay(&out, &backing, Some(d.virtual_size))
                        .map_err(|source| CloneError::Overlay { path: out, source })?;
                    let on_disk = tmp.join(&recorded);
                    let (size, dev, ino, mtime_ns) =
                        identity(&on_disk).map_err(PathIoError::at("reading", &on_disk))?;
                    bases.push(BaseDisk {
                        name: d.name.clone(),
                        path: recorded,
                        sha256: d.sha256.clone(),
                        size,
                        dev,
                        ino,
                        mtime_ns,
                    });
                    disks.push(rel);
                }
                let nvram = own_nvram(&module_dir, vm, &tmp)?;
                vms.push(CloneVm {
                    name: vm.name.clone(),
                    disks,
                    bases,
                    nvram,
                });
            }
            let c = CloneRecord {
                name: name.clone(),
                module: rec.name.clone(),
                module_path: module_dir.clone(),
                snapshot,
                vms,
            };
            let y = serde_saphyr::to_string(&c).map_err(|e| CloneError::Bad {
                path: tmp.join(CLONE_FILE),
                reason: e.to_string(),
            })?;
            fs::write(tmp.join(CLONE_FILE), y).map_err(PathIoError::at("writing", &tmp))?;
            fs::rename(&tmp, &dst).map_err(PathIoError::at("renaming into", &dst))?;
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

/// Gives a clone's VM a copy of the NVRAM its module captured, when the module was built
/// booting through UEFI firmware: `nvram/<vm>.fd` in the clone folder `dst`. The relative
/// path, or None when the VM boots directly or through BIOS.
fn own_nvram(module_dir: &Path, vm: &VmRecord, dst: &Path) -> Result<Option<String>, CloneError> {
    let Some(fw) = vm.firmware.as_ref().filter(|f| f.booted) else {
        return Ok(None);
    };
    let wrap = |source| CloneError::Nvram {
        vm: vm.name.clone(),
        source,
    };
    let Some(parent) = nvram::recorded(module_dir, &vm.name, fw).map_err(wrap)? else {
        return Ok(None);
    };
    // The VM name (untrusted, from module.yaml) becomes a file name.
    module::check_name(&vm.name)?;
    let rel = format!("{}/{}.fd", nvram::NVRAM_DIR, vm.name);
    let folder = dst.join(nvram::NVRAM_DIR);
    fs::create_dir_all(&folder).map_err(PathIoError::at("creating", &folder))?;
    nvram::copy_parent(&parent, &dst.join(&rel)).map_err(wrap)?;
    Ok(Some(rel))
}

/// How clone `c`'s VM `cv` boots, its module's record being `mv` (in `module_dir`): through
/// the firmware the module was built booting through (UEFI with the clone's own NVRAM), else
/// directly with the module's kernel.
pub fn boot_mode(
    clone_dir: &Path,
    c: &CloneRecord,
    cv: &CloneVm,
    module_dir: &Path,
    mv: &VmRecord,
) -> Result<BootMode, CloneError> {
    if let Some(fw) = mv.firmware.as_ref().filter(|f| f.booted) {
        let nvram = if fw.firmware.has_nvram() {
            let missing = |path: PathBuf, reason: String| CloneError::NvramMissing {
                clone: c.name.clone(),
                vm: cv.name.clone(),
                firmware: fw.firmware.as_str(),
                path,
                reason,
            };
            let rel = cv.nvram.as_deref().ok_or_else(|| {
                missing(
                    clone_dir
                        .join(nvram::NVRAM_DIR)
                        .join(format!("{}.fd", cv.name)),
                    "the clone was made without one".into(),
                )
            })?;
            let path = clone_dir.join(rel);
            match fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(missing(path, "not a regular file".into())),
                Err(e) => return Err(missing(path, e.to_string())),
            }
            Some(path)
        } else {
            None
        };
        return Ok(BootMode::Firmware(FirmwareBoot {
            firmware: fw.firmware,
            nvram,
        }));
    }
    let boot = mv
        .boot
        .as_ref()
        .ok_or_else(|| CloneError::NoBoot(cv.name.clone()))?;
    Ok(BootMode::Direct(BootFiles {
        kernel: module_dir.join(&boot.kernel),
        initrd: boot.initrd.as_ref().map(|i| module_dir.join(i)),
        root: boot.root.clone(),
        args: boot.args.clone(),
    }))
}

/// Checks that every disk under the clone's overlays is still the one it was made on: the
/// same file, unchanged (device, inode, size, modification time), or else the same bytes
/// (SHA-256 against the module's record). Clones made before kiln recorded their bases are
/// let through with a warning.
pub fn verify_bases(clone_dir: &Path, c: &CloneRecord) -> Result<(), CloneError> {
    for vm in &c.vms {
        if vm.bases.is_empty() {
            tracing::warn!(
                "clone `{}`: made before kiln recorded its base disks; not checked",
                c.name
            );
            continue;
        }
        for b in &vm.bases {
            let path = clone_dir.join(&b.path);
            let missing = |source| CloneError::BaseMissing {
                clone: c.name.clone(),
                vm: vm.name.clone(),
                disk: b.name.clone(),
                path: path.clone(),
                source,
            };
            let id = identity(&path).map_err(missing)?;
            if id == (b.size, b.dev, b.ino, b.mtime_ns) {
                continue;
            }
            let found = crate::cache::sha256_file(&path).map_err(missing)?;
            if found != b.sha256 {
                return Err(CloneError::BaseChanged(Box::new(BaseChanged {
                    clone: c.name.clone(),
                    vm: vm.name.clone(),
                    disk: b.name.clone(),
                    path,
                    expected: b.sha256.clone(),
                    found,
                })));
            }
            tracing::debug!("{}: same bytes under another identity", path.display());
        }
    }
    Ok(())
}

/// The clones in `clones` made from the module folder `module_dir`, by name.
pub fn users(clones: &Path, module_dir: &Path) -> Result<Vec<String>, CloneError> {
    let want = fs::canonicalize(module_dir).map_err(PathIoError::at("resolving", module_dir))?;
    Ok(list(clones)?
        .into_iter()
        .filter(|(_, c)| fs::canonicalize(&c.module_path).unwrap_or(c.module_path.clone()) == want)
        .map(|(_, c)| c.name)
        .collect())
}

pub fn load(dir: &Path) -> Result<CloneRecord, CloneError> {
    let p = dir.join(CLONE_FILE);
    let text = fs::read_to_string(&p).map_err(PathIoError::at("reading", &p))?;
    serde_saphyr::from_str(&text).map_err(|e| CloneError::Bad {
        path: p,
        reason: e.to_string(),
    })
}

/// What clones of the module at `module_dir` inherit: the base network, NICs and resources
/// (`base.yaml`, written by the build). `None` for a module built before kiln recorded it:
/// its clones get no network.
pub fn load_base(module_dir: &Path) -> Result<Option<BaseView>, CloneError> {
    Ok(module::read_base(module_dir)?)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::job::Firmware;
    use crate::module::{DiskRecord, FirmwareRecord, PendingModule};

    const MIB: u64 = 1 << 20;

    /// A qcow2 disk at `path` holding `text` at offset 0 (over `backing`, if named).
    fn disk(path: &Path, text: &[u8], backing: Option<&str>) {
        match backing {
            Some(b) => kiln_disk::create_overlay(path, b, Some(4 * MIB)).unwrap(),
            None => kiln_disk::create(
                path,
                &kiln_disk::CreateOptions {
                    size: Some(4 * MIB),
                    ..Default::default()
                },
            )
            .unwrap(),
        }
        let d = kiln_disk::open(path, kiln_disk::OpenOptions::read_write()).unwrap();
        d.write_at(text, 0).unwrap();
        d.flush().unwrap();
    }

    fn read(path: &Path, len: usize) -> Vec<u8> {
        let d = kiln_disk::open(path, kiln_disk::OpenOptions::read_only()).unwrap();
        let mut b = vec![0; len];
        d.read_at(&mut b, 0).unwrap();
        b
    }

    /// Builds module `name` in `modules` whose one disk reads `text` (a thin layer over
    /// module `parent`'s disk when named), replacing an older one.
    fn build(modules: &Path, name: &str, text: &[u8], parent: Option<&str>) -> PathBuf {
        build_with(modules, name, text, parent, None)
    }

    /// A UEFI VM's record and its NVRAM bytes, as a firmware build captures them.
    pub(crate) fn uefi(nvram: &[u8]) -> (FirmwareRecord, Vec<u8>) {
        let rec = FirmwareRecord {
            firmware: Firmware::Uefi,
            booted: true,
            nvram: Some("nvram/web.fd".into()),
            nvram_sha256: Some(crate::cache::sha256_bytes(nvram)),
        };
        (rec, nvram.to_vec())
    }

    /// [`build`] with VM `web`'s firmware record, and its NVRAM file written where the
    /// record names it (when it names one inside the module).
    pub(crate) fn build_with(
        modules: &Path,
        name: &str,
        text: &[u8],
        parent: Option<&str>,
        firmware: Option<(FirmwareRecord, Vec<u8>)>,
    ) -> PathBuf {
        let p = PendingModule::begin(modules, name, true).unwrap();
        if let Some((FirmwareRecord { nvram: Some(n), .. }, bytes)) = &firmware {
            if !n.contains("..") && !n.starts_with('/') {
                fs::create_dir_all(p.dir().join(n).parent().unwrap()).unwrap();
                fs::write(p.dir().join(n), bytes).unwrap();
            }
        }
        let file = "disks/web-root.qcow2";
        // The relative name resolves the same from the partial folder (a sibling).
        let backing = parent.map(|p| format!("../../{p}/disks/web-root.qcow2"));
        disk(&p.dir().join(file), text, backing.as_deref());
        let backing_sha256 =
            parent.map(|p| crate::cache::sha256_file(&modules.join(p).join(file)).unwrap());
        fs::write(p.dir().join("boot/vmlinuz"), text).unwrap();
        fs::write(p.dir().join(module::BASE_FILE), b"{}").unwrap();
        let sha = crate::cache::sha256_file(&p.dir().join(file)).unwrap();
        let rec = ModuleRecord {
            api_version: "kiln/v1".into(),
            kind: "Module".into(),
            name: name.into(),
            kiln_version: "0".into(),
            kiln_commit: String::new(),
            engine: "qemu".into(),
            built_at: 0,
            build_seconds: 0.0,
            vms: vec![VmRecord {
                name: "web".into(),
                cpus: 1,
                memory_mib: 256,
                source: serde_json::Value::Null,
                agent_in_image: true,
                boot: Some(module::BootRecord {
                    kernel: "boot/vmlinuz".into(),
                    initrd: None,
                    root: "/dev/vda".into(),
                    args: vec!["rootflags=subvol=root".into()],
                }),
                firmware: firmware.map(|f| f.0),
                invisible: false,
                disks: vec![DiskRecord {
                    name: "root".into(),
                    file: file.into(),
                    sha256: sha,
                    virtual_size: 4 * MIB,
                    file_size: 0,
                    backing,
                    backing_sha256,
                    backing_module: parent.map(String::from),
                    bus: Default::default(),
                }],
                isos: vec![],
                layers: vec![],
            }],
            manifest: String::new(),
        };
        p.commit(&rec).unwrap()
    }

    pub(crate) fn clone_of(modules: &Path, clones: &Path, name: &str, prefix: &str) -> PathBuf {
        let (dir, rec) = module::find(modules, name).unwrap();
        create(&dir, &rec, clones, prefix, 1).unwrap().remove(0)
    }

    fn overlay(c: &Path) -> PathBuf {
        c.join("disks/web-root.qcow2")
    }

    #[test]
    fn a_forced_rebuild_leaves_existing_clones_on_their_own_base() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        build(&modules, "m", b"v1", None);
        let c1 = clone_of(&modules, &clones, "m", "one");
        let r1 = load(&c1).unwrap();
        assert_eq!(r1.snapshot.as_deref(), Some(Path::new("base/m")));
        verify_bases(&c1, &r1).unwrap();

        build(&modules, "m", b"v2", None);
        // The old clone still reads v1, passes the run check, and boots v1's kernel.
        assert_eq!(read(&overlay(&c1), 2), b"v1");
        verify_bases(&c1, &r1).unwrap();
        let mdir = module_dir(&c1, &r1);
        assert_eq!(fs::read(mdir.join("boot/vmlinuz")).unwrap(), b"v1");
        assert!(mdir.join(module::BASE_FILE).is_file());
        // A new clone reads v2.
        let c2 = clone_of(&modules, &clones, "m", "two");
        assert_eq!(read(&overlay(&c2), 2), b"v2");
        verify_bases(&c2, &load(&c2).unwrap()).unwrap();
        assert_eq!(
            users(&clones, &modules.join("m")).unwrap(),
            ["one-1", "two-1"]
        );
    }

    #[test]
    fn a_thin_module_clone_keeps_its_parent_layer_too() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        build(&modules, "p", b"p1", None);
        build(&modules, "c", b"c", Some("p"));
        let c1 = clone_of(&modules, &clones, "c", "c");
        let r1 = load(&c1).unwrap();
        assert!(c1.join("base/p/disks/web-root.qcow2").is_file());
        // The parent is rebuilt (and so the child module on it is no longer valid)...
        let p = build(&modules, "p", b"p2", None);
        let _ = p;
        let (cdir, crec) = module::find(&modules, "c").unwrap();
        assert!(module::verify_layers(&cdir, &crec).is_err());
        // ...but the clone sits on the chain it was made on.
        let mdir = module_dir(&c1, &r1);
        module::verify_layers(&mdir, &module::load(&mdir).unwrap()).unwrap();
        verify_bases(&c1, &r1).unwrap();
        let d1 = kiln_disk::open(overlay(&c1), kiln_disk::OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 1];
        d1.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"c");
        // Past the child's own write: the parent's byte, from the parent it was made on.
        d1.read_at(&mut b, 1).unwrap();
        assert_eq!(&b, b"1");
    }

    #[test]
    fn run_check_refuses_a_changed_or_missing_base_and_hashes_only_on_change() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        build(&modules, "m", b"v1", None);
        let c = clone_of(&modules, &clones, "m", "m");
        let mut r = load(&c).unwrap();
        let base = c.join(&r.vms[0].bases[0].path);

        // Same bytes, another mtime: hashed, and let through.
        let f = fs::File::options().write(true).open(&base).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        verify_bases(&c, &r).unwrap();

        // A clone whose links could not be made backs onto the module's file: a rebuild
        // there is refused with the disk, both digests and what to do.
        r.snapshot = None;
        r.vms[0].bases[0].path = modules.join("m/disks/web-root.qcow2");
        let want = r.vms[0].bases[0].sha256.clone();
        build(&modules, "m", b"v2", None);
        let e = verify_bases(&c, &r).unwrap_err();
        let CloneError::BaseChanged(ch) = &e else {
            panic!("{e}")
        };
        assert_eq!((ch.disk.as_str(), &ch.expected), ("root", &want));
        assert_ne!(ch.found, want);
        let msg = e.to_string();
        assert!(
            msg.contains("kiln rm --clone m-1") && msg.contains(&want),
            "{msg}"
        );

        // A base that is gone.
        fs::remove_file(&base).unwrap();
        let r = load(&c).unwrap();
        let e = verify_bases(&c, &r).unwrap_err();
        assert!(matches!(e, CloneError::BaseMissing { .. }), "{e}");
    }
}

#[cfg(test)]
mod firmware_tests {
    use super::tests::{build_with, clone_of, uefi};
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn boot_of(clone_dir: &Path) -> Result<BootMode, CloneError> {
        let c = load(clone_dir).unwrap();
        let mdir = module_dir(clone_dir, &c);
        let rec = module::load(&mdir).unwrap();
        boot_mode(clone_dir, &c, &c.vms[0], &mdir, &rec.vms[0])
    }

    #[test]
    fn a_uefi_module_clone_gets_its_own_nvram_and_boots_through_the_firmware() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        let m = build_with(&modules, "m", b"v1", None, Some(uefi(b"vars-v1")));
        let c = clone_of(&modules, &clones, "m", "m");
        let own = c.join("nvram/web.fd");
        assert_eq!(fs::read(&own).unwrap(), b"vars-v1");
        assert_eq!(
            fs::metadata(&own).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            load(&c).unwrap().vms[0].nvram.as_deref(),
            Some("nvram/web.fd")
        );
        let BootMode::Firmware(fw) = boot_of(&c).unwrap() else {
            panic!("a firmware build's clone boots through the firmware")
        };
        assert_eq!(fw.firmware, crate::job::Firmware::Uefi);
        assert_eq!(fw.nvram.as_deref(), Some(&*own));

        // The clone's variables are its own: writes there never reach the module, and a
        // second clone starts from the module's again.
        fs::write(&own, b"vars-changed-by-the-guest").unwrap();
        assert_eq!(fs::read(m.join("nvram/web.fd")).unwrap(), b"vars-v1");
        let c2 = clone_of(&modules, &clones, "m", "two");
        assert_eq!(fs::read(c2.join("nvram/web.fd")).unwrap(), b"vars-v1");

        // Its NVRAM gone, the clone is refused with the file named, not booted blank.
        fs::remove_file(&own).unwrap();
        let e = boot_of(&c).unwrap_err();
        assert!(
            matches!(e, CloneError::NvramMissing { .. })
                && e.to_string().contains(&*own.to_string_lossy())
                && e.to_string().contains("kiln rm --clone m-1"),
            "{e}"
        );
    }

    #[test]
    fn bios_and_direct_builds_and_modules_without_a_record_keep_their_boot() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        // No record: the kernel, directly.
        build_with(&modules, "plain", b"v1", None, None);
        let c = clone_of(&modules, &clones, "plain", "plain");
        let BootMode::Direct(b) = boot_of(&c).unwrap() else {
            panic!("direct")
        };
        assert!(b.kernel.ends_with("boot/vmlinuz"), "{b:?}");
        // The image's own kernel arguments, recorded at capture, reach the clone's boot.
        assert_eq!(b.args, ["rootflags=subvol=root"]);
        // UEFI is what the image is for, but the build booted it directly: so does the clone,
        // and it needs no NVRAM.
        let (mut fw, bytes) = uefi(b"vars");
        fw.booted = false;
        fw.nvram = None;
        fw.nvram_sha256 = None;
        build_with(&modules, "direct", b"v1", None, Some((fw, bytes)));
        let c = clone_of(&modules, &clones, "direct", "direct");
        assert!(matches!(boot_of(&c).unwrap(), BootMode::Direct(_)));
        assert!(!c.join(nvram::NVRAM_DIR).exists());
        // BIOS: through SeaBIOS, no NVRAM.
        let (mut fw, bytes) = uefi(b"");
        fw.firmware = crate::job::Firmware::Bios;
        fw.nvram = None;
        build_with(&modules, "bios", b"v1", None, Some((fw, bytes)));
        let c = clone_of(&modules, &clones, "bios", "bios");
        let BootMode::Firmware(f) = boot_of(&c).unwrap() else {
            panic!("bios")
        };
        assert_eq!((f.firmware, f.nvram), (crate::job::Firmware::Bios, None));
    }

    #[test]
    fn a_tampered_missing_or_escaping_module_nvram_makes_no_clone() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        let clone_err = |name: &str| {
            let (dir, rec) = module::find(&modules, name).unwrap();
            let e = create(&dir, &rec, &clones, name, 1).unwrap_err();
            assert!(
                fs::read_dir(&clones).unwrap().next().is_none(),
                "{name}: nothing is left in {}",
                clones.display()
            );
            e
        };

        let m = build_with(&modules, "tampered", b"v1", None, Some(uefi(b"vars")));
        fs::write(m.join("nvram/web.fd"), b"other vars").unwrap();
        let e = clone_err("tampered");
        assert!(
            matches!(
                &e,
                CloneError::Nvram {
                    source: NvramError::Changed { .. },
                    ..
                }
            ),
            "{e}"
        );

        let m = build_with(&modules, "missing", b"v1", None, Some(uefi(b"vars")));
        fs::remove_file(m.join("nvram/web.fd")).unwrap();
        let e = clone_err("missing").to_string();
        assert!(
            e.contains(&*m.join("nvram/web.fd").to_string_lossy()),
            "{e}"
        );

        let (mut fw, bytes) = uefi(b"root:x:0:0");
        fw.nvram = Some("../../etc/passwd".into());
        build_with(&modules, "escape", b"v1", None, Some((fw, bytes)));
        let e = clone_err("escape");
        assert!(
            matches!(
                &e,
                CloneError::Nvram {
                    source: NvramError::BadPath { .. },
                    ..
                }
            ),
            "{e}"
        );
    }
}
