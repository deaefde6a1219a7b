//! The module store: `<modules>/<name>/` holds `module.yaml` (the manifest as built, resolved
//! inputs, engine, kiln version, each disk's digest), `disks/<vm>-<disk>.qcow2`,
//! `boot/<vm>/` (kernel and initrd for the direct boot) and `logs/`.
//!
//! A module is built under `.<name>.partial-<pid>` next to its final place and renamed when
//! complete; a build that fails or is interrupted removes the partial folder, so a module
//! folder is always whole. An existing module is replaced only when the build was asked to
//! (`--force`); otherwise the build is refused before it starts, and the final rename refuses
//! too if a module appeared meanwhile (rename(2) never replaces a non-empty folder).

use crate::path_io::PathIoError;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::job::BaseView;

pub const MODULE_FILE: &str = "module.yaml";
/// The file in a module that records what clones inherit (base network, NICs, resources).
pub const BASE_FILE: &str = "base.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error("module `{name}` not found in {dir}")]
    NotFound { name: String, dir: PathBuf },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("module `{module}` has VMs {vms:?}: name one with vmName")]
    WhichVm { module: String, vms: Vec<String> },
    #[error("module `{module}` has no VM `{vm}` (it has {vms:?})")]
    NoVm {
        module: String,
        vm: String,
        vms: Vec<String>,
    },
    #[error("`{0}` is not a valid module name (a DNS label)")]
    Name(String),
    #[error(
        "module `{name}` already exists at {}; pass --force to replace it (its clones keep \
         the disks they were made from)",
        dir.display()
    )]
    Exists { name: String, dir: PathBuf },
    #[error(
        "{} exists but is not a module (no {MODULE_FILE}); remove or rename it first",
        dir.display()
    )]
    NotAModule { dir: PathBuf },
}

/// `module.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleRecord {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub kiln_version: String,
    /// The git commit of the kiln that built it (empty in modules made before it was kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kiln_commit: String,
    pub engine: String,
    /// Unix seconds.
    pub built_at: u64,
    pub build_seconds: f64,
    pub vms: Vec<VmRecord>,
    /// The manifest as built, verbatim.
    pub manifest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The resolved source (URL with digest, bootstrap package versions, parent module...).
    pub source: serde_json::Value,
    pub agent_in_image: bool,
    /// The kernel and initrd a direct boot loads (absent for a VM that boots through firmware
    /// only).
    pub boot: Option<BootRecord>,
    /// The firmware the VM boots through when not directly: recorded so clones and `buildRef`
    /// children boot the same way. Absent in modules made before firmware boot: BIOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareRecord>,
    pub disks: Vec<DiskRecord>,
    /// `invisible: true`: kept out of every console view, the build's and (should clones get
    /// a console) its clones'.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invisible: bool,
    /// The ISOs the build attached (`isos`), each with the digest it was checked against or,
    /// given without a checksum, the one kiln computed. Never captured or cloned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isos: Vec<IsoRecord>,
    /// The step cache's layers the VM's disks went through, bottom first: the ones reused
    /// and the ones this build took (see [`crate::step_cache`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRef>,
}

/// A step cache layer a VM's build used or made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRef {
    /// The step it follows, 1-based.
    pub step: usize,
    pub key: String,
    /// Whether the build started from it rather than running the step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

/// An ISO a VM's build attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IsoRecord {
    pub url: String,
    pub sha256: String,
}

/// A VM's firmware and its NVRAM as captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareRecord {
    pub firmware: crate::job::Firmware,
    /// Whether the build booted the VM through this firmware (`true`) or directly (`false`,
    /// the firmware is then what the image is meant for).
    pub booted: bool,
    /// UEFI: the VM's variable store at capture (`nvram/<vm>.fd`, relative to the module
    /// folder); clones and children start from a copy of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootRecord {
    /// Paths relative to the module folder.
    pub kernel: String,
    pub initrd: Option<String>,
    pub root: String,
    /// The image's own kernel arguments (e.g. `rootflags=subvol=root`), which clones and
    /// `buildRef` children boot with as the build did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskRecord {
    pub name: String,
    /// Relative to the module folder.
    pub file: String,
    pub sha256: String,
    pub virtual_size: u64,
    pub file_size: u64,
    /// For `--thin` captures: the parent module's disk this one is a layer over, as written
    /// in the layer's header (relative to this disk's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// The parent disk's SHA-256 when this layer was captured: a parent rebuilt since is
    /// refused instead of silently changing this module's contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_sha256: Option<String>,
    /// The parent module's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_module: Option<String>,
    /// The bus the disk was built on: its clones' guests look for it there.
    #[serde(default, skip_serializing_if = "crate::job::DiskBus::is_virtio")]
    pub bus: crate::job::DiskBus,
}

pub fn check_name(name: &str) -> Result<(), ModuleError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ModuleError::Name(name.into()))
    }
}

/// Whether a build may write `<modules>/<name>`: refused if a module is there, unless
/// `replace`; a folder there that is not a module is never replaced.
pub fn check_replace(modules: &Path, name: &str, replace: bool) -> Result<(), ModuleError> {
    check_name(name)?;
    let dir = modules.join(name);
    match fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PathIoError::at("checking", &dir)(e).into()),
        Ok(_) if !dir.join(MODULE_FILE).is_file() => Err(ModuleError::NotAModule { dir }),
        Ok(_) if replace => Ok(()),
        Ok(_) => Err(ModuleError::Exists {
            name: name.into(),
            dir,
        }),
    }
}

/// A module being written.
pub struct PendingModule {
    name: String,
    tmp: PathBuf,
    dst: PathBuf,
    replace: bool,
    committed: bool,
    /// Held on `tmp` while this lives: start-up clean-up leaves a locked partial alone.
    _lock: crate::leftovers::OwnerLock,
}

impl PendingModule {
    /// Starts `<modules>/<name>` under a temporary name. With `replace` false an existing
    /// module of that name refuses the build now (and at [`commit`](Self::commit)).
    pub fn begin(modules: &Path, name: &str, replace: bool) -> Result<Self, ModuleError> {
        check_replace(modules, name, replace)?;
        fs::create_dir_all(modules).map_err(PathIoError::at("creating", modules))?;
        let tmp = modules.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        for sub in ["disks", "boot", "logs", "work"] {
            let p = tmp.join(sub);
            fs::create_dir_all(&p).map_err(PathIoError::at("creating", &p))?;
        }
        let lock =
            crate::leftovers::OwnerLock::hold(&tmp).map_err(PathIoError::at("locking", &tmp))?;
        Ok(Self {
            name: name.into(),
            tmp,
            dst: modules.join(name),
            replace,
            committed: false,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn final_dir(&self) -> &Path {
        &self.dst
    }

    /// Writes `base.yaml`, what clones of this module inherit ([`read_base`] reads it).
    pub fn write_base(&self, base: &BaseView) -> Result<(), ModuleError> {
        let p = self.tmp.join(BASE_FILE);
        let yaml = serde_saphyr::to_string(base).map_err(|e| ModuleError::Bad {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&p, yaml).map_err(PathIoError::at("writing", &p))?;
        Ok(())
    }

    /// Writes module.yaml and renames the folder into place. Without `replace`, a module that
    /// appeared since [`begin`](Self::begin) makes this fail (the rename itself refuses: no
    /// window between check and rename). With it, an older module of the same name is
    /// replaced only once the new one is complete; clones of the old one hold hard links to
    /// its files (see [`crate::clone`]), so removing it does not change them.
    pub fn commit(mut self, record: &ModuleRecord) -> Result<PathBuf, ModuleError> {
        let _ = fs::remove_dir_all(self.tmp.join("work"));
        let yaml = serde_saphyr::to_string(record).map_err(|e| ModuleError::Bad {
            path: self.tmp.join(MODULE_FILE),
            reason: e.to_string(),
        })?;
        let y = self.tmp.join(MODULE_FILE);
        fs::write(&y, yaml).map_err(PathIoError::at("writing", &y))?;
        check_replace(
            self.dst.parent().unwrap_or(Path::new(".")),
            &self.name,
            self.replace,
        )?;
        let old = self
            .dst
            .with_file_name(format!(".{}.old-{}", self.name, std::process::id()));
        let had_old = self.replace && self.dst.join(MODULE_FILE).is_file();
        if had_old {
            fs::rename(&self.dst, &old).map_err(PathIoError::at("moving aside", &self.dst))?;
        }
        // rename(2) onto a non-empty folder fails (ENOTEMPTY/EEXIST): a module written by
        // another build after the check above is never replaced without `replace`.
        if let Err(e) = fs::rename(&self.tmp, &self.dst) {
            if had_old {
                let _ = fs::rename(&old, &self.dst);
            }
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) {
                return Err(ModuleError::Exists {
                    name: self.name.clone(),
                    dir: self.dst.clone(),
                });
            }
            return Err(PathIoError::at("renaming into", &self.dst)(e).into());
        }
        if had_old {
            if let Err(e) = fs::remove_dir_all(&old) {
                tracing::warn!("removing the replaced module {}: {e}", old.display());
            }
        }
        self.committed = true;
        Ok(self.dst.clone())
    }

    /// Leaves the partial folder in place for the user to look at (`--on-error abort`), and
    /// returns where it is: start-up clean-up removes it once this process has ended.
    pub fn keep(mut self) -> PathBuf {
        // Dropped as if committed: nothing is removed.
        self.committed = true;
        self.tmp.clone()
    }
}

impl Drop for PendingModule {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// What clones of the module at `dir` inherit: the base network, NICs and resources
/// (`base.yaml`, written by the build). `None` for a module built before kiln recorded it.
pub fn read_base(dir: &Path) -> Result<Option<BaseView>, ModuleError> {
    let p = dir.join(BASE_FILE);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PathIoError::at("reading", &p)(source).into()),
    };
    serde_saphyr::from_str(&text)
        .map(Some)
        .map_err(|e| ModuleError::Bad {
            path: p,
            reason: e.to_string(),
        })
}

/// Removes a module or clone folder as a whole: renamed to a hidden name first (so no
/// half-removed folder is ever seen under its name), then deleted.
pub fn remove_folder(dir: &Path) -> Result<(), ModuleError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!(".{name}.rm-{}", std::process::id()));
    fs::rename(dir, &doomed).map_err(PathIoError::at("removing", dir))?;
    fs::remove_dir_all(&doomed).map_err(PathIoError::at("removing", &doomed))?;
    Ok(())
}

/// The modules in `modules` with a thin disk over module `name`.
pub fn thin_children(modules: &Path, name: &str) -> Result<Vec<String>, ModuleError> {
    Ok(list(modules)?
        .into_iter()
        .filter(|(_, r)| {
            r.name != name
                && r.vms
                    .iter()
                    .flat_map(|v| &v.disks)
                    .any(|d| d.backing_module.as_deref() == Some(name))
        })
        .map(|(_, r)| r.name)
        .collect())
}

/// Reads `<dir>/module.yaml`.
pub fn load(dir: &Path) -> Result<ModuleRecord, ModuleError> {
    let p = dir.join(MODULE_FILE);
    let text = fs::read_to_string(&p).map_err(PathIoError::at("reading", &p))?;
    serde_saphyr::from_str(&text).map_err(|e| ModuleError::Bad {
        path: p,
        reason: e.to_string(),
    })
}

/// Finds a module by name (or path) in `modules`.
pub fn find(modules: &Path, name: &str) -> Result<(PathBuf, ModuleRecord), ModuleError> {
    let as_path = Path::new(name);
    let dir = if as_path.join(MODULE_FILE).is_file() {
        as_path.to_path_buf()
    } else {
        modules.join(name)
    };
    if !dir.join(MODULE_FILE).is_file() {
        return Err(ModuleError::NotFound {
            name: name.into(),
            dir: modules.to_path_buf(),
        });
    }
    let r = load(&dir)?;
    Ok((dir, r))
}

/// Every complete module in `modules`, by name.
pub fn list(modules: &Path) -> Result<Vec<(PathBuf, ModuleRecord)>, ModuleError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(modules) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(PathIoError::at("reading", modules)(e).into()),
    };
    for e in rd.flatten() {
        let p = e.path();
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && p.join(MODULE_FILE).is_file() {
            match load(&p) {
                Ok(r) => out.push((p, r)),
                Err(err) => tracing::warn!("skipping {}: {err}", p.display()),
            }
        }
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(out)
}

/// Picks a VM of a module (the only one, or by name).
pub fn pick_vm<'a>(rec: &'a ModuleRecord, vm: Option<&str>) -> Result<&'a VmRecord, ModuleError> {
    let names = || rec.vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
    match vm {
        Some(n) => rec
            .vms
            .iter()
            .find(|v| v.name == n)
            .ok_or_else(|| ModuleError::NoVm {
                module: rec.name.clone(),
                vm: n.into(),
                vms: names(),
            }),
        None if rec.vms.len() == 1 => Ok(&rec.vms[0]),
        None => Err(ModuleError::WhichVm {
            module: rec.name.clone(),
            vms: names(),
        }),
    }
}

/// Checks that every thin disk of a module still sits on the parent disk it was captured
/// over: the backing file exists and has the recorded SHA-256. Standalone disks pass at once.
/// Clones and runs of a thin module call this first (a rebuilt or deleted parent would
/// otherwise change or break the module silently).
pub fn verify_layers(dir: &Path, rec: &ModuleRecord) -> Result<(), ModuleError> {
    for vm in &rec.vms {
        for d in &vm.disks {
            let Some(backing) = &d.backing else { continue };
            let disk = dir.join(&d.file);
            let parent = kiln_disk::resolve_backing(&disk, backing);
            let bad = |reason: String| ModuleError::Bad {
                path: disk.clone(),
                reason,
            };
            let got = crate::cache::sha256_file(&parent).map_err(|e| {
                bad(format!(
                    "this thin disk is a layer over {} (module `{}`), which cannot be read: {e}",
                    parent.display(),
                    d.backing_module.as_deref().unwrap_or("?")
                ))
            })?;
            if let Some(want) = &d.backing_sha256 {
                if &got != want {
                    return Err(bad(format!(
                        "this thin disk is a layer over {} (module `{}`), which changed since \
                         it was captured (sha256 {} now, {} then); rebuild the parent as it \
                         was, or rebuild this module",
                        parent.display(),
                        d.backing_module.as_deref().unwrap_or("?"),
                        &got[..12],
                        &want[..want.len().min(12)]
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> ModuleRecord {
        ModuleRecord {
            api_version: "kiln/v1".into(),
            kind: "Module".into(),
            name: name.into(),
            kiln_version: "0.1.0".into(),
            kiln_commit: "0123456789ab".into(),
            engine: "qemu".into(),
            built_at: 1,
            build_seconds: 2.5,
            vms: vec![VmRecord {
                name: "web".into(),
                cpus: 1,
                memory_mib: 1024,
                source: serde_json::json!({"bootstrap": {"suite": "bookworm", "packageVersions": {"bash": "5.2"}}}),
                agent_in_image: true,
                boot: Some(BootRecord {
                    kernel: "boot/web/vmlinuz".into(),
                    initrd: Some("boot/web/initrd.img".into()),
                    root: "/dev/vda".into(),
                    args: vec![],
                }),
                firmware: None,
                invisible: false,
                disks: vec![DiskRecord {
                    name: "root".into(),
                    file: "disks/web-root.qcow2".into(),
                    sha256: "ab".repeat(32),
                    virtual_size: 4 << 30,
                    file_size: 12345,
                    backing: None,
                    backing_sha256: None,
                    backing_module: None,
                    bus: Default::default(),
                }],
                isos: vec![],
                layers: vec![],
            }],
            manifest: "vms:\n  - name: web\n".into(),
        }
    }

    #[test]
    fn commit_renames_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = PendingModule::begin(d.path(), "hello", false).unwrap();
        fs::write(p.dir().join("disks/x"), b"x").unwrap();
        assert!(!d.path().join("hello").exists());
        let dst = p.commit(&record("hello")).unwrap();
        assert!(dst.join("disks/x").is_file());
        assert!(!dst.join("work").exists());
        let (_, r) = find(d.path(), "hello").unwrap();
        assert_eq!(r.name, "hello");
        assert_eq!(r.vms[0].disks[0].virtual_size, 4 << 30);
        assert_eq!(
            r.vms[0].source["bootstrap"]["packageVersions"]["bash"],
            "5.2"
        );
        assert_eq!(r.manifest, "vms:\n  - name: web\n");
        assert_eq!(list(d.path()).unwrap().len(), 1);
    }

    #[test]
    fn the_kernel_arguments_round_trip_and_none_are_not_written() {
        let d = tempfile::tempdir().unwrap();
        let dst = PendingModule::begin(d.path(), "plain", false)
            .unwrap()
            .commit(&record("plain"))
            .unwrap();
        let text = fs::read_to_string(dst.join("module.yaml")).unwrap();
        assert!(!text.contains("args:"), "{text}");
        assert!(load(&dst).unwrap().vms[0]
            .boot
            .as_ref()
            .unwrap()
            .args
            .is_empty());

        let mut rec = record("subvol");
        let args = vec!["rootflags=subvol=root".to_string(), "quiet".to_string()];
        rec.vms[0].boot.as_mut().unwrap().args = args.clone();
        let dst = PendingModule::begin(d.path(), "subvol", false)
            .unwrap()
            .commit(&rec)
            .unwrap();
        assert_eq!(load(&dst).unwrap().vms[0].boot.as_ref().unwrap().args, args);
    }

    #[test]
    fn a_disk_keeps_its_bus_and_virtio_is_not_written() {
        let d = tempfile::tempdir().unwrap();
        let mut rec = record("buses");
        let mut data = rec.vms[0].disks[0].clone();
        data.name = "data".into();
        data.bus = crate::job::DiskBus::Scsi;
        rec.vms[0].disks.push(data);
        let dst = PendingModule::begin(d.path(), "buses", false)
            .unwrap()
            .commit(&rec)
            .unwrap();
        let text = fs::read_to_string(dst.join("module.yaml")).unwrap();
        assert_eq!(text.matches("bus:").count(), 1, "{text}");
        let buses: Vec<_> = load(&dst).unwrap().vms[0]
            .disks
            .iter()
            .map(|d| d.bus)
            .collect();
        assert_eq!(
            buses,
            [crate::job::DiskBus::Virtio, crate::job::DiskBus::Scsi]
        );
    }

    #[test]
    fn dropped_build_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        {
            let p = PendingModule::begin(d.path(), "half", false).unwrap();
            fs::write(p.dir().join("disks/x"), b"x").unwrap();
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(list(d.path()).unwrap().is_empty());
    }

    #[test]
    fn a_kept_build_stays_in_place_unlocked_and_is_no_module() {
        let d = tempfile::tempdir().unwrap();
        let p = PendingModule::begin(d.path(), "half", false).unwrap();
        fs::write(p.dir().join("work/root.qcow2"), b"x").unwrap();
        let kept = p.keep();
        assert!(kept.join("work/root.qcow2").is_file());
        assert!(!crate::leftovers::is_owned(&kept), "still locked");
        assert!(list(d.path()).unwrap().is_empty());
    }

    #[test]
    fn rebuild_replaces_the_old_module_whole_only_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let p = PendingModule::begin(d.path(), "m", false).unwrap();
        fs::write(p.dir().join("disks/old"), b"1").unwrap();
        p.commit(&record("m")).unwrap();
        // Refused before any work, naming the folder and the flag.
        let e = PendingModule::begin(d.path(), "m", false).err().unwrap();
        assert!(matches!(e, ModuleError::Exists { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("--force") && msg.contains(&d.path().join("m").display().to_string()));
        let p = PendingModule::begin(d.path(), "m", true).unwrap();
        fs::write(p.dir().join("disks/new"), b"2").unwrap();
        p.commit(&record("m")).unwrap();
        assert!(d.path().join("m/disks/new").is_file());
        assert!(!d.path().join("m/disks/old").exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_module_that_appears_during_the_build_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = PendingModule::begin(d.path(), "m", false).unwrap();
        fs::write(p.dir().join("disks/mine"), b"1").unwrap();
        // Another build commits the same module first.
        fs::create_dir_all(d.path().join("m/disks")).unwrap();
        fs::write(d.path().join("m/disks/theirs"), b"2").unwrap();
        fs::write(d.path().join("m").join(MODULE_FILE), b"x").unwrap();
        let e = p.commit(&record("m")).err().unwrap();
        assert!(matches!(e, ModuleError::Exists { .. }), "{e}");
        assert!(d.path().join("m/disks/theirs").is_file());
        assert!(!d.path().join("m/disks/mine").exists());
        // The refused build's partial folder is gone.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_folder_that_is_not_a_module_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("m")).unwrap();
        fs::write(d.path().join("m/notes.txt"), b"keep").unwrap();
        for replace in [false, true] {
            let e = PendingModule::begin(d.path(), "m", replace).err().unwrap();
            assert!(matches!(e, ModuleError::NotAModule { .. }), "{e}");
        }
        assert!(d.path().join("m/notes.txt").is_file());
    }

    #[test]
    fn vm_picking() {
        let mut r = record("m");
        assert_eq!(pick_vm(&r, None).unwrap().name, "web");
        r.vms.push(VmRecord {
            name: "db".into(),
            ..r.vms[0].clone()
        });
        assert!(matches!(
            pick_vm(&r, None),
            Err(ModuleError::WhichVm { .. })
        ));
        assert_eq!(pick_vm(&r, Some("db")).unwrap().name, "db");
        assert!(matches!(
            pick_vm(&r, Some("x")),
            Err(ModuleError::NoVm { .. })
        ));
        assert!(check_name("Bad_Name").is_err());
        assert!(check_name("good-name-2").is_ok());
    }
}
