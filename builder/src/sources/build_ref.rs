//! The `buildRef` source: a VM built over another module's captured disk. The module store
//! finds and checks the parent; this turns it into a source.

use std::path::Path;

use super::{base_image, BaseImage, BootFiles, ParentDisk, ResolvedSource};
use crate::module::{self, ModuleError};

/// A `buildRef` source: the parent module's captured boot disk as the base of the child's
/// overlay, with the parent's kernel.
pub fn resolve(
    modules: &Path,
    name: &str,
    vm: Option<&str>,
) -> Result<ResolvedSource, ModuleError> {
    let (dir, rec) = module::find(modules, name)?;
    let v = module::pick_vm(&rec, vm)?;
    let disk = v.disks.first().ok_or_else(|| ModuleError::Bad {
        path: dir.join(module::MODULE_FILE),
        reason: format!("VM `{}` has no disks", v.name),
    })?;
    let path = dir.join(&disk.file);
    let base = base_image(&path).map_err(|e| ModuleError::Bad {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let boot = v.boot.as_ref().map(|b| BootFiles {
        kernel: dir.join(&b.kernel),
        initrd: b.initrd.as_ref().map(|i| dir.join(i)),
        root: b.root.clone(),
        args: vec![],
    });
    module::verify_layers(&dir, &rec)?;
    Ok(ResolvedSource {
        base: Some(BaseImage { ..base }),
        boot,
        agent_in_image: v.agent_in_image,
        parent_disk: Some(ParentDisk {
            module: rec.name.clone(),
            path: path.clone(),
            sha256: disk.sha256.clone(),
        }),
        record: serde_json::json!({
            "buildRef": { "module": rec.name, "vm": v.name, "diskSha256": disk.sha256, "path": path }
        }),
    })
}
