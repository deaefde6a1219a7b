//! What each kind of source runs on the host, and root, which bootstrapping needs.

use super::{Finding, Status};

pub fn findings() -> Vec<Finding> {
    vec![bootstrap_tools(), root()]
}

/// `source.bootstrap` (mmdebstrap, mkfs, GRUB, the ESP's FAT tools). Image and URL sources
/// need none of them: kiln reads and writes those disks itself.
fn bootstrap_tools() -> Finding {
    let missing = crate::sources::bootstrap::missing_tools();
    if missing.is_empty() {
        return Finding::ok(
            "bootstrap tools",
            "mmdebstrap, mkfs.ext4, mkfs.vfat, mtools, GRUB for BIOS and UEFI",
        );
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| p.as_str()).collect();
    packages.dedup();
    Finding::bad(
        "bootstrap tools",
        Status::Warn,
        format!(
            "missing {}: `source.bootstrap` cannot be built (image and URL sources can)",
            missing
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!("install the Debian packages {}", packages.join(" ")),
    )
}

/// mmdebstrap makes a base's root as root; nothing else kiln does needs it.
fn root() -> Finding {
    if crate::runtime::euid() == 0 {
        Finding::ok("root", "running as root: every source kind can be built")
    } else {
        Finding::bad(
            "root",
            Status::Warn,
            format!(
                "running as uid {}: `source.bootstrap` bases cannot be made here \
                 (mmdebstrap runs as root); image and URL sources, clones and `kiln serve` \
                 work",
                crate::runtime::euid()
            ),
            "build manifests with a bootstrap source as root, or use image or URL sources",
        )
    }
}
