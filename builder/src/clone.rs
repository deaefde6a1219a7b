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
//! Either way `clone.yaml` records each base disk's SHA-256 (the module's record of it) and
//! its device, inode, size and modification time; [`verify_bases`] refuses a base that is no
//! longer the one the clone was made on, and hashes only when those identifiers changed.

use crate::path_io::PathIoError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diskops;
use crate::job::BaseView;
use crate::module::{self, ModuleError, ModuleRecord};

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
                vms.push(CloneVm {
                    name: vm.name.clone(),
                    disks,
                    bases,
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
mod tests {
    use super::*;
    use crate::module::{DiskRecord, PendingModule, VmRecord};

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
        let p = PendingModule::begin(modules, name, true).unwrap();
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
            engine: "qemu".into(),
            built_at: 0,
            build_seconds: 0.0,
            vms: vec![VmRecord {
                name: "web".into(),
                cpus: 1,
                memory_mib: 256,
                source: serde_json::Value::Null,
                agent_in_image: true,
                boot: None,
                firmware: None,
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
            }],
            manifest: String::new(),
        };
        p.commit(&rec).unwrap()
    }

    fn clone_of(modules: &Path, clones: &Path, name: &str, prefix: &str) -> PathBuf {
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
