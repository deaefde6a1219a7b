//! The `buildRef` source: a VM built over another module's captured disk. The module store
//! finds and checks the parent; this turns it into a source.
//!
//! The child inherits the parent VM's firmware: it boots through the same firmware unless
//! its own manifest asks for another (`efiFirmware`), and its UEFI NVRAM starts as a copy of
//! the one the parent captured, so boot entries and other variables the parent's build wrote
//! are still there.

use std::path::Path;

use super::{base_image, BaseImage, BootFiles, ParentDisk, ResolvedSource};
use crate::job::Firmware;
use crate::module::{self, ModuleError};
use crate::nvram::{self, ParentNvram};

/// What a parent VM's module records about its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentFirmware {
    pub firmware: Firmware,
    /// Whether the parent's build booted through it (else directly: the firmware is then
    /// what the image is meant for).
    pub booted: bool,
    /// UEFI: the parent's captured NVRAM (inside its module folder; its digest is checked
    /// when copied).
    pub nvram: Option<ParentNvram>,
}

/// The firmware a `buildRef` child VM boots through, and the NVRAM it starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedFirmware<'a> {
    pub firmware: Firmware,
    /// The parent's build booted through this same firmware: so does the child's.
    pub parent_booted: bool,
    /// Start the child's NVRAM from a copy of this ([`nvram::start_nvram`]); None: from the
    /// firmware's blank template.
    pub nvram: Option<&'a ParentNvram>,
    /// Printed with the build's boot choice when the child's manifest replaced the parent's
    /// firmware.
    pub note: Option<String>,
}

/// The firmware of child VM `vm`, whose manifest asks for `child` (the job's firmware: BIOS
/// when it sets no `efiFirmware`), over `parent` (its source's
/// [`ResolvedSource::parent_firmware`]). A child that sets no `efiFirmware` inherits the
/// parent's firmware and NVRAM; one that asks for another firmware gets it, with a note,
/// and a blank NVRAM (another firmware's variables do not carry over).
pub fn inherited_firmware<'a>(
    vm: &str,
    child: Firmware,
    parent: Option<&'a ParentFirmware>,
) -> InheritedFirmware<'a> {
    let own = InheritedFirmware {
        firmware: child,
        parent_booted: false,
        nvram: None,
        note: None,
    };
    let Some(p) = parent else {
        return own;
    };
    if child == Firmware::Bios || child == p.firmware {
        return InheritedFirmware {
            firmware: p.firmware,
            parent_booted: p.booted,
            nvram: p.nvram.as_ref(),
            note: None,
        };
    }
    InheritedFirmware {
        note: Some(format!(
            "VM `{vm}`: efiFirmware asks for {} firmware, which replaces the {} firmware of \
             the module it is built on; its NVRAM starts blank",
            child.as_str(),
            p.firmware.as_str()
        )),
        ..own
    }
}

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
        args: b.args.clone(),
    });
    module::verify_layers(&dir, &rec)?;
    let parent_firmware = match &v.firmware {
        Some(fw) => Some(ParentFirmware {
            firmware: fw.firmware,
            booted: fw.booted,
            nvram: nvram::recorded(&dir, &v.name, fw).map_err(|e| ModuleError::Bad {
                path: dir.clone(),
                reason: e.to_string(),
            })?,
        }),
        None => None,
    };
    Ok(ResolvedSource {
        base: Some(BaseImage { ..base }),
        boot,
        agent_in_image: v.agent_in_image,
        parent_disk: Some(ParentDisk {
            module: rec.name.clone(),
            path: path.clone(),
            sha256: disk.sha256.clone(),
        }),
        parent_firmware,
        record: serde_json::json!({
            "buildRef": { "module": rec.name, "vm": v.name, "diskSha256": disk.sha256, "path": path }
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::tests::{build_with, uefi};

    #[test]
    fn a_child_gets_its_parents_firmware_and_nvram() {
        let d = tempfile::tempdir().unwrap();
        let modules = d.path().join("modules");
        let p = build_with(&modules, "p", b"v1", None, Some(uefi(b"vars")));
        let src = resolve(&modules, "p", None).unwrap();
        // The parent image's own kernel arguments go on to the child's direct boot.
        assert_eq!(src.boot.as_ref().unwrap().args, ["rootflags=subvol=root"]);
        let pf = src.parent_firmware.as_ref().expect("the parent's firmware");
        assert_eq!((pf.firmware, pf.booted), (Firmware::Uefi, true));
        let pn = pf.nvram.as_ref().expect("the parent's NVRAM");
        assert_eq!(pn.path, p.join("nvram/web.fd"));

        // No efiFirmware in the child: the parent's firmware, booted the same way, from its
        // NVRAM, which start_nvram copies (checked).
        let got = inherited_firmware("child", Firmware::Bios, Some(pf));
        assert_eq!(
            got,
            InheritedFirmware {
                firmware: Firmware::Uefi,
                parent_booted: true,
                nvram: Some(pn),
                note: None,
            }
        );
        let dest = d.path().join("child.fd");
        nvram::start_nvram(&dest, got.nvram, Path::new("/nonexistent")).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"vars");
        // The same firmware asked for again: the same.
        assert_eq!(inherited_firmware("child", Firmware::Uefi, Some(pf)), got);
        // Another firmware: the child's, with a note, from the blank template.
        let other = inherited_firmware("child", Firmware::UefiSecureBoot, Some(pf));
        assert_eq!(
            (other.firmware, other.parent_booted, other.nvram),
            (Firmware::UefiSecureBoot, false, None)
        );
        let note = other.note.unwrap();
        assert!(
            note.contains("VM `child`") && note.contains("uefi-secure-boot"),
            "{note}"
        );
        // A parent without a record (or another source): the child's own.
        let own = inherited_firmware("child", Firmware::Bios, None);
        assert_eq!(
            (own.firmware, own.nvram, own.note),
            (Firmware::Bios, None, None)
        );
    }

    #[test]
    fn a_parent_nvram_outside_its_module_or_missing_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let modules = d.path().join("modules");
        let (mut fw, bytes) = uefi(b"vars");
        fw.nvram = Some("../../etc/passwd".into());
        build_with(&modules, "p", b"v1", None, Some((fw, bytes)));
        let e = resolve(&modules, "p", None).unwrap_err().to_string();
        assert!(e.contains("../../etc/passwd"), "{e}");

        let p = build_with(&modules, "q", b"v1", None, Some(uefi(b"vars")));
        std::fs::remove_file(p.join("nvram/web.fd")).unwrap();
        let e = resolve(&modules, "q", None).unwrap_err().to_string();
        assert!(
            e.contains(&*p.join("nvram/web.fd").to_string_lossy()),
            "{e}"
        );
    }
}
