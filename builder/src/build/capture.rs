//! Capture: each of the VM's disks written into the module as a standalone compressed qcow2
//! (or, for a `--thin` `buildRef` child, a layer over its parent's disk); a direct-booted VM's
//! kernel and initrd copied beside them so clones boot them directly, a UEFI VM's NVRAM so
//! clones start from the variables the build left.

use std::fs;
use std::path::Path;

use super::error::{CaptureError, VmError, WriteError};
use super::source::VmDisks;
use super::vm::VmBuild;
use crate::engine::BootMode;
use crate::module::{BootRecord, DiskRecord, FirmwareRecord};
use crate::nvram;
use crate::sources::{BootFiles, ParentDisk, ResolvedSource};

/// Captures the VM's disks into the module; the overlays they were are removed. A Ctrl-C
/// during a capture ends the build once that disk is written: no module is committed after
/// an interrupt.
pub(super) fn run(
    b: &VmBuild,
    src: &ResolvedSource,
    disks: &VmDisks,
) -> Result<Vec<DiskRecord>, VmError> {
    (b.capturing)();
    let mut records = Vec::new();
    for (i, a) in disks.disks.iter().enumerate() {
        // --thin: a buildRef child's boot disk becomes a layer over its parent's disk.
        let thin_over = src
            .parent_disk
            .as_ref()
            .filter(|_| b.module.opts.thin && i == 0);
        let mut rec = capture_to_module(
            b.module.pending.dir(),
            b.module.pending.final_dir(),
            &b.vm.name,
            &a.name,
            &a.path,
            thin_over,
        )?;
        rec.bus = a.bus;
        let _ = fs::remove_file(&a.path);
        records.push(rec);
        if b.cancelled() {
            return Err(VmError::Cancelled);
        }
    }
    Ok(records)
}

/// Copies the kernel and initrd of a direct-booted VM into the module: clones boot them
/// directly.
pub(super) fn boot_files(b: &VmBuild, boot: &BootFiles) -> Result<BootRecord, VmError> {
    let dir = b.module.pending.dir();
    fs::create_dir_all(dir.join("boot").join(&b.vm.name)).map_err(VmError::BootFiles)?;
    let kernel = format!("boot/{}/vmlinuz", b.vm.name);
    fs::copy(&boot.kernel, dir.join(&kernel)).map_err(VmError::BootFiles)?;
    let initrd = match &boot.initrd {
        Some(i) => {
            let rel = format!("boot/{}/initrd.img", b.vm.name);
            fs::copy(i, dir.join(&rel)).map_err(VmError::BootFiles)?;
            Some(rel)
        }
        None => None,
    };
    Ok(BootRecord {
        kernel,
        initrd,
        root: boot.root.clone(),
        args: boot.args.clone(),
    })
}

/// The VM's firmware record; a UEFI VM's NVRAM, as the guest left it, is copied into the
/// module as `nvram/<vm>.fd` (whole or not at all, 0600, size-checked). Called
/// once the VM is down, so the firmware writes nothing more.
pub(super) fn firmware(b: &VmBuild, disks: &VmDisks) -> Result<FirmwareRecord, VmError> {
    let (firmware, booted, nvram) = match &disks.boot {
        BootMode::Direct(_) => (disks.firmware, false, None),
        BootMode::Firmware(f) => (f.firmware, true, f.nvram.as_deref()),
    };
    let mut record = FirmwareRecord {
        firmware,
        booted,
        nvram: None,
        nvram_sha256: None,
    };
    let Some(from) = nvram else {
        return Ok(record);
    };
    let (rel, sha256) = nvram::capture_nvram(b.module.pending.dir(), &b.vm.name, from)?;
    let _ = fs::remove_file(from);
    record.nvram = Some(rel);
    record.nvram_sha256 = Some(sha256);
    Ok(record)
}

/// Captures one of a VM's disks into the module being written at `module_dir` (which becomes
/// `final_dir`), as `disks/<vm>-<disk>.qcow2`: a standalone compressed qcow2, or with
/// `thin_over` a compressed layer holding only what the VM changed over that parent disk,
/// whose backing name is relative (from `final_dir/disks` to the parent), so a folder of
/// modules can move as a whole.
pub fn capture_to_module(
    module_dir: &Path,
    final_dir: &Path,
    vm: &str,
    disk: &str,
    overlay: &Path,
    thin_over: Option<&ParentDisk>,
) -> Result<DiskRecord, CaptureError> {
    let rel = format!("disks/{vm}-{disk}.qcow2");
    let out = module_dir.join(&rel);
    let e = |source: WriteError| CaptureError {
        disk: out.clone(),
        source,
    };
    let (_, virtual_size) = crate::diskops::probe(overlay).map_err(|x| e(x.into()))?;
    let (sha256, backing) = match thin_over {
        None => (capture_disk(overlay, &out)?, None),
        Some(p) => {
            let parent = fs::canonicalize(&p.path).map_err(|source| {
                e(WriteError::Parent {
                    path: p.path.clone(),
                    source,
                })
            })?;
            let modules = final_dir.parent().filter(|d| !d.as_os_str().is_empty());
            let modules = fs::canonicalize(modules.unwrap_or(Path::new(".")))
                .map_err(|x| e(WriteError::ModulesFolder(x)))?;
            let name = final_dir
                .file_name()
                .ok_or_else(|| e(WriteError::NoModuleName))?;
            let from = modules.join(name).join("disks");
            let backing = crate::diskops::relative_path(&from, &parent);
            let backing = backing
                .to_str()
                .ok_or_else(|| e(WriteError::NotUtf8(backing.clone())))?
                .to_string();
            let st = crate::diskops::capture_thin(overlay, &parent, &backing, &out)
                .map_err(|x| e(x.into()))?;
            tracing::info!(
                vm,
                disk,
                changed = st.changed_clusters,
                unchanged = st.same_clusters,
                "thin capture over {}",
                parent.display()
            );
            let sha = crate::cache::sha256_file(&out).map_err(|x| e(x.into()))?;
            (sha, Some((backing, p)))
        }
    };
    let file_size = fs::metadata(&out)
        .map(|m| m.len())
        .map_err(|x| e(x.into()))?;
    Ok(DiskRecord {
        name: disk.to_string(),
        file: rel,
        sha256,
        virtual_size,
        file_size,
        backing_sha256: backing.as_ref().map(|(_, p)| p.sha256.clone()),
        backing_module: backing.as_ref().map(|(_, p)| p.module.clone()),
        backing: backing.map(|(b, _)| b),
        // The caller knows the bus; a capture is the same whatever it was.
        bus: Default::default(),
    })
}

/// Writes the chain under `overlay` as a standalone compressed qcow2 at `out`; returns its
/// SHA-256.
pub fn capture_disk(overlay: &Path, out: &Path) -> Result<String, CaptureError> {
    let e = |source: WriteError| CaptureError {
        disk: out.to_path_buf(),
        source,
    };
    crate::diskops::capture_compressed(overlay, out).map_err(|x| e(x.into()))?;
    crate::cache::sha256_file(out).map_err(|x| e(x.into()))
}
