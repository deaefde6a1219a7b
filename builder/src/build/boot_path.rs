//! The boot path of each VM: kiln's direct kernel boot (the fast path) or the firmware running
//! the image's own boot loader, chosen from the VM's `boot` choice, its `efiFirmware` and what
//! its source turned out to hold, with the reason the build prints.

use crate::job::{BootChoice, Firmware, SourceSpec, VmJob};
use crate::sources::build_ref::InheritedFirmware;
use crate::sources::BootFiles;

/// How one VM boots.
#[derive(Debug, Clone)]
pub(super) enum BootPath {
    Direct(BootFiles),
    Firmware(Firmware),
}

/// A VM's boot path and why it was chosen.
#[derive(Debug, Clone)]
pub(super) struct Chosen {
    pub path: BootPath,
    pub why: String,
}

impl Chosen {
    /// The build's note, e.g. `boot: firmware (uefi): efiFirmware is set`.
    pub fn note(&self) -> String {
        match &self.path {
            BootPath::Direct(_) => format!("boot: direct ({})", self.why),
            BootPath::Firmware(f) => format!("boot: firmware ({}): {}", f.as_str(), self.why),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "a direct boot (`boot: direct` or `--boot direct`) needs a kernel kiln can read, and this \
     source has none: {why}; use `boot: auto` or `firmware` to boot its own boot loader"
)]
pub struct DirectWithoutKernel {
    why: String,
}

const FORCED: &str = "forced (`boot: firmware` or `--boot firmware`)";
const EFI_SET: &str = "efiFirmware is set";
const PARENT_BOOTED: &str = "the parent module booted through it";
const BLANK: &str = "blank disk: install from ISO";

/// Why the VM boots through firmware whatever its source holds, if it does: known before its
/// source is resolved, so the engine can be picked for it.
pub(super) fn firmware_before_resolve(vm: &VmJob) -> Option<&'static str> {
    match vm.boot {
        BootChoice::Direct => None,
        BootChoice::Firmware => Some(FORCED),
        BootChoice::Auto if vm.firmware != Firmware::Bios => Some(EFI_SET),
        BootChoice::Auto if matches!(vm.source, SourceSpec::Blank) => Some(BLANK),
        BootChoice::Auto => None,
    }
}

/// Why the kvm engine cannot run this VM, when its firmware boot is known before resolving.
pub(super) fn kvm_refusal(vm: &VmJob) -> Option<String> {
    firmware_before_resolve(vm).map(|why| {
        format!(
            "VM `{}` boots through {} firmware ({why}), and the kvm engine (kiln-vmm) boots \
             only a kernel directly",
            vm.name,
            vm.firmware.as_str()
        )
    })
}

/// The VM's boot path once its source is resolved: `fw` is its firmware (a `buildRef`
/// child's inherited from its parent), `boot` the source's kernel (None with `no_kernel`
/// saying why).
pub(super) fn choose(
    vm: &VmJob,
    fw: &InheritedFirmware,
    boot: Option<&BootFiles>,
    no_kernel: Option<&str>,
) -> Result<Chosen, DirectWithoutKernel> {
    let firmware = |why: &str| Chosen {
        path: BootPath::Firmware(fw.firmware),
        why: why.to_string(),
    };
    let no_kernel = || no_kernel.unwrap_or("the source has no kernel kiln can read");
    if vm.boot == BootChoice::Direct {
        return match boot {
            Some(b) => Ok(Chosen {
                path: BootPath::Direct(b.clone()),
                why: format!("forced; {}", kernel_origin(&vm.source)),
            }),
            None => Err(DirectWithoutKernel {
                why: no_kernel().to_string(),
            }),
        };
    }
    if let Some(why) = firmware_before_resolve(vm) {
        return Ok(firmware(why));
    }
    // The parent's image boots through its firmware: its kernel may not be one kiln's
    // direct boot can start, and the child keeps the parent's NVRAM.
    if fw.parent_booted {
        return Ok(firmware(PARENT_BOOTED));
    }
    let Some(b) = boot else {
        return Ok(firmware(no_kernel()));
    };
    if let Some(why) = root_unnamed(&b.root) {
        return Ok(firmware(&why));
    }
    Ok(Chosen {
        path: BootPath::Direct(b.clone()),
        why: kernel_origin(&vm.source).to_string(),
    })
}

/// Where a direct boot's kernel comes from, for the note.
fn kernel_origin(source: &SourceSpec) -> &'static str {
    match source {
        SourceSpec::Bootstrap(_) => "the bootstrap base's kernel",
        SourceSpec::BuildRef { .. } => "the parent module's kernel",
        _ => "kernel /boot/vmlinuz-* in the image",
    }
}

/// Why `root` is not something kiln's direct boot can name on its command line, if it is not:
/// the root the image's own boot loader would find is then the one to trust.
fn root_unnamed(root: &str) -> Option<String> {
    const NAMED: &[&str] = &["UUID=", "PARTUUID=", "LABEL=", "PARTLABEL=", "/dev/"];
    if root.trim().is_empty() {
        return Some("the image's root file system was not found for a direct boot".into());
    }
    (!NAMED.iter().any(|p| root.starts_with(p)))
        .then(|| format!("the image's root `{root}` is not something kiln's direct boot can name"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::build_ref::{inherited_firmware, ParentFirmware};

    fn vm(source: SourceSpec, firmware: Firmware, boot: BootChoice) -> VmJob {
        VmJob {
            firmware,
            boot,
            ..VmJob::for_test("web", source)
        }
    }

    fn url() -> SourceSpec {
        SourceSpec::Url {
            url: "http://127.0.0.1/x.qcow2".into(),
            sha256: None,
        }
    }

    fn kernel(root: &str) -> BootFiles {
        BootFiles {
            kernel: "/c/vmlinuz".into(),
            initrd: None,
            root: root.into(),
            args: vec![],
        }
    }

    /// `choose` for a VM that inherits no firmware (not a buildRef child).
    fn choose_own(
        vm: &VmJob,
        boot: Option<&BootFiles>,
        no_kernel: Option<&str>,
    ) -> Result<Chosen, DirectWithoutKernel> {
        let fw = inherited_firmware(&vm.name, vm.firmware, None);
        choose(vm, &fw, boot, no_kernel)
    }

    const NO_EXT4: &str = "no kernel kiln can read (no ext4 file system with /boot/vmlinuz-*)";

    #[test]
    fn auto_boots_a_readable_kernel_directly_and_the_rest_through_firmware() {
        let k = kernel("UUID=0b6c1a3e");
        let c = choose_own(&vm(url(), Firmware::Bios, BootChoice::Auto), Some(&k), None).unwrap();
        assert!(matches!(c.path, BootPath::Direct(_)));
        assert_eq!(
            c.note(),
            "boot: direct (kernel /boot/vmlinuz-* in the image)"
        );

        let c = choose_own(
            &vm(url(), Firmware::Bios, BootChoice::Auto),
            None,
            Some(NO_EXT4),
        )
        .unwrap();
        assert!(matches!(c.path, BootPath::Firmware(Firmware::Bios)));
        assert_eq!(c.note(), format!("boot: firmware (bios): {NO_EXT4}"));

        // efiFirmware asks for firmware even where the kernel is readable.
        let v = vm(url(), Firmware::Uefi, BootChoice::Auto);
        let c = choose_own(&v, Some(&k), None).unwrap();
        assert_eq!(c.note(), "boot: firmware (uefi): efiFirmware is set");
        assert!(kvm_refusal(&v).unwrap().contains(
            "VM `web` boots through uefi firmware (efiFirmware is set), and the kvm engine"
        ));

        let blank = vm(SourceSpec::Blank, Firmware::Bios, BootChoice::Auto);
        assert_eq!(firmware_before_resolve(&blank), Some(BLANK));
        assert_eq!(
            firmware_before_resolve(&vm(url(), Firmware::Bios, BootChoice::Auto)),
            None
        );

        // A root direct boot cannot name.
        let c = choose_own(
            &vm(url(), Firmware::Bios, BootChoice::Auto),
            Some(&kernel("")),
            None,
        )
        .unwrap();
        assert!(
            matches!(c.path, BootPath::Firmware(Firmware::Bios)),
            "{c:?}"
        );
    }

    #[test]
    fn a_forced_choice_wins_and_direct_without_a_kernel_says_why() {
        let k = kernel("UUID=0b6c1a3e");
        let v = vm(url(), Firmware::Uefi, BootChoice::Direct);
        let c = choose_own(&v, Some(&k), None).unwrap();
        assert!(matches!(c.path, BootPath::Direct(_)));
        assert_eq!(kvm_refusal(&v), None);
        let e = choose_own(&v, None, Some(NO_EXT4)).unwrap_err().to_string();
        assert!(
            e.contains("needs a kernel kiln can read") && e.contains(NO_EXT4),
            "{e}"
        );

        let bootstrap = SourceSpec::Bootstrap(crate::job::BootstrapSpec {
            distro: "debian".into(),
            suite: "bookworm".into(),
            packages: vec![],
            mirror: None,
            kernel: None,
        });
        let v = vm(bootstrap, Firmware::Bios, BootChoice::Firmware);
        let c = choose_own(&v, Some(&k), None).unwrap();
        assert_eq!(
            c.note(),
            "boot: firmware (bios): forced (`boot: firmware` or `--boot firmware`)"
        );
        assert!(kvm_refusal(&v).is_some());
    }

    #[test]
    fn a_build_ref_child_boots_through_the_firmware_its_parent_booted() {
        let k = kernel("UUID=0b6c1a3e");
        let child = |fw| {
            vm(
                SourceSpec::BuildRef {
                    module: "base".into(),
                    vm: None,
                },
                fw,
                BootChoice::Auto,
            )
        };
        let parent = |firmware, booted| ParentFirmware {
            firmware,
            booted,
            nvram: None,
        };
        // No efiFirmware in the child, parent booted UEFI: UEFI, though its kernel is readable.
        let v = child(Firmware::Bios);
        let p = parent(Firmware::Uefi, true);
        let fw = inherited_firmware("web", v.firmware, Some(&p));
        let c = choose(&v, &fw, Some(&k), None).unwrap();
        assert_eq!(
            c.note(),
            "boot: firmware (uefi): the parent module booted through it"
        );
        // A parent booted directly: the child too, its firmware kept for the record.
        let p = parent(Firmware::Uefi, false);
        let fw = inherited_firmware("web", v.firmware, Some(&p));
        let c = choose(&v, &fw, Some(&k), None).unwrap();
        assert!(matches!(c.path, BootPath::Direct(_)), "{c:?}");
        // The child forcing direct boot wins over its parent's firmware.
        let mut d = child(Firmware::Bios);
        d.boot = BootChoice::Direct;
        let p = parent(Firmware::Bios, true);
        let fw = inherited_firmware("web", d.firmware, Some(&p));
        let c = choose(&d, &fw, Some(&k), None).unwrap();
        assert!(matches!(c.path, BootPath::Direct(_)), "{c:?}");
        // A child asking for Secure Boot over a plain-UEFI parent: its own firmware.
        let v = child(Firmware::UefiSecureBoot);
        let p = parent(Firmware::Uefi, true);
        let fw = inherited_firmware("web", v.firmware, Some(&p));
        let c = choose(&v, &fw, Some(&k), None).unwrap();
        assert_eq!(
            c.note(),
            "boot: firmware (uefi-secure-boot): efiFirmware is set"
        );
    }
}
