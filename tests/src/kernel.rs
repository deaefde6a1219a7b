//! The Debian cloud kernel for real-guest tests, fetched as a package and unpacked into
//! kiln's cache (`<cache>/test-kernel/<package>/`), never installed on the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cache_dir, run, KitError, Result};

/// The metapackage that names the current cloud kernel.
pub const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The metapackage of Debian's generic kernel: the one installers boot, with the drivers the
/// cloud kernel leaves out (AHCI, floppy, e1000, DRM).
pub const GENERIC_METAPACKAGE: &str = "linux-image-amd64";

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the unpacked package.
    pub modules_dir: PathBuf,
    /// `boot/config-<release>`: which drivers are built in (`=y`) or modules (`=m`).
    pub config: PathBuf,
}

/// Get the cloud kernel: resolve the metapackage to the concrete image package with
/// apt-cache, `apt-get download` it and `dpkg-deb -x` it into the cache. Later calls reuse
/// the unpacked tree. Unpacking goes to a temp dir renamed into place, so concurrent tests
/// and interrupted runs never see half a tree.
pub fn guest_kernel() -> Result<KernelFiles> {
    package_kernel(METAPACKAGE)
}

/// The kernel `metapackage` names today (e.g. [`GENERIC_METAPACKAGE`]), fetched and cached the
/// same way as [`guest_kernel`].
pub fn package_kernel(metapackage: &str) -> Result<KernelFiles> {
    let package = concrete_package(metapackage)?;
    let root = cache_dir().join("test-kernel").join(&package);
    if !root.join("boot").is_dir() {
        fetch(&package, &root)?;
    }
    describe(&root)
}

/// `linux-image-<release>` that the metapackage depends on.
pub(crate) fn concrete_package(metapackage: &str) -> Result<String> {
    let out = run(Command::new("apt-cache").args(["depends", metapackage]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
        .ok_or_else(|| {
            KitError::Other(format!("apt-cache names no kernel image for {metapackage}"))
        })
}

fn fetch(package: &str, root: &Path) -> Result<()> {
    let parent = root
        .parent()
        .ok_or_else(|| KitError::Other("cache path has no parent".into()))?;
    std::fs::create_dir_all(parent)
        .map_err(KitError::io(format!("create {}", parent.display())))?;
    let tmp = tempdir_in(parent)?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&tmp))?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(KitError::io("list download dir"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| KitError::Other(format!("apt-get download {package} left no .deb")))?;
    let tree = tmp.join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    // Another test may have won the race; its tree is as good as ours.
    if std::fs::rename(&tree, root).is_err() && !root.join("boot").is_dir() {
        return Err(KitError::Other(format!(
            "cannot move kernel into {}",
            root.display()
        )));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    let p = parent.join(format!(".tmp-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&p).map_err(KitError::io(format!("create {}", p.display())))?;
    Ok(p)
}

pub(crate) fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn describe(root: &Path) -> Result<KernelFiles> {
    let modules = root.join("lib/modules");
    let release = std::fs::read_dir(&modules)
        .map_err(KitError::io(format!("list {}", modules.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| KitError::Other(format!("no module tree under {}", modules.display())))?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(KitError::Other(format!("{} missing", vmlinuz.display())));
    }
    Ok(KernelFiles {
        modules_dir: modules.join(&release),
        config: root.join("boot").join(format!("config-{release}")),
        vmlinuz,
        release,
    })
}

impl KernelFiles {
    /// How the kernel config sets `CONFIG_<name>`: `Some('y')`, `Some('m')` or `None`.
    pub fn config_value(&self, name: &str) -> Option<char> {
        let text = std::fs::read_to_string(&self.config).ok()?;
        let key = format!("CONFIG_{name}=");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.chars().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_kernel_has_virtio_modules_with_dependencies() {
        let k = match guest_kernel() {
            Ok(k) => k,
            Err(e) => return crate::skip(format!("cannot get the Debian cloud kernel: {e}")),
        };
        assert!(k.vmlinuz.is_file());
        assert_eq!(k.config_value("VIRTIO_BLK"), Some('m'));
        let blk = k.modules_dir.join("kernel/drivers/block/virtio_blk.ko");
        let deps = crate::initramfs::module_depends(&blk).unwrap();
        assert!(deps.iter().any(|d| d == "virtio_ring"), "{deps:?}");
        // Cached: a second call finds the unpacked tree without downloading.
        let again = guest_kernel().unwrap();
        assert_eq!(again.vmlinuz, k.vmlinuz);
    }
}
