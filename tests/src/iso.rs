//! Bootable ISO images for the ISO-install tests: a folder of files and a GRUB configuration
//! made into a hybrid image by `grub-mkrescue` (El Torito for BIOS and UEFI, as distribution
//! installers are), cached by their inputs in `<cache>/test-images/iso-<key>.iso`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{cache_dir, on_path, run, KitError, Result};

/// Changes whenever how an ISO is made changes, so old images are not reused.
const RECIPE_VERSION: &str = "iso-1";

/// Why this host cannot make an ISO (a missing program), or `None`.
pub fn cannot_build() -> Option<String> {
    for (program, package) in [
        ("grub-mkrescue", "grub-common"),
        ("xorriso", "xorriso"),
        ("mformat", "mtools"),
    ] {
        if !on_path(program) {
            return Some(format!(
                "`{program}` is not installed (Debian package {package})"
            ));
        }
    }
    let lib = Path::new("/usr/lib/grub");
    for (platform, package) in [
        ("i386-pc", "grub-pc-bin"),
        ("x86_64-efi", "grub-efi-amd64-bin"),
    ] {
        if !lib.join(platform).is_dir() {
            return Some(format!(
                "GRUB for {platform} is not installed (Debian package {package})"
            ));
        }
    }
    None
}

/// An ISO with `grub_cfg` as `/boot/grub/grub.cfg` and each `(path in the ISO, host file)` of
/// `files`, bootable by SeaBIOS and OVMF from a CD-ROM. Made once per content: the key covers
/// the configuration, every file's path and bytes, and the host's GRUB.
pub fn grub_iso(grub_cfg: &str, files: &[(&str, &Path)]) -> Result<PathBuf> {
    if let Some(why) = cannot_build() {
        return Err(KitError::Other(why));
    }
    let grub = run(Command::new("grub-mkrescue").arg("--version"))?;
    let mut h = Sha256::new();
    h.update(format!("{RECIPE_VERSION}\n{grub}\n{grub_cfg}\n"));
    for (dest, src) in files {
        h.update(format!("{dest}\n"));
        hash_file(&mut h, src)?;
    }
    let key: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = cache_dir().join("test-images");
    let iso = dir.join(format!("iso-{key}.iso"));
    if iso.is_file() {
        return Ok(iso);
    }
    fs::create_dir_all(&dir).map_err(KitError::io(format!("create {}", dir.display())))?;
    let tmp = dir.join(format!(
        ".iso-{key}-{}-{}",
        std::process::id(),
        crate::kernel::nanos()
    ));
    let result = make(&tmp, &iso, grub_cfg, files);
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| iso)
}

/// QEMU arguments for `iso` as a read-only CD-ROM on q35's first AHCI port, booted after
/// a disk with `bootindex=0`, as the ISO-install VMs have it.
pub fn cdrom_args(iso: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "if=none,id=cd0,media=cdrom,readonly=on,format=raw,file={}",
            iso.display()
        ),
        "-device".into(),
        "ide-cd,drive=cd0,bus=ide.0,bootindex=1".into(),
    ]
}

fn make(tmp: &Path, iso: &Path, grub_cfg: &str, files: &[(&str, &Path)]) -> Result<()> {
    let tree = tmp.join("tree");
    let cfg = tree.join("boot/grub/grub.cfg");
    fs::create_dir_all(cfg.parent().unwrap_or(&tree))
        .map_err(KitError::io(format!("create {}", tree.display())))?;
    fs::write(&cfg, grub_cfg).map_err(KitError::io(format!("write {}", cfg.display())))?;
    for (dest, src) in files {
        let to = tree.join(dest.trim_start_matches('/'));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .map_err(KitError::io(format!("create {}", parent.display())))?;
        }
        fs::copy(src, &to).map_err(KitError::io(format!("copy {} into the ISO", src.display())))?;
    }
    let out = tmp.join("out.iso");
    run(Command::new("grub-mkrescue").arg("-o").arg(&out).arg(&tree))?;
    // Another test may have made the same image meanwhile; it is as good as ours.
    fs::rename(&out, iso).map_err(KitError::io(format!("rename into {}", iso.display())))
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = fs::File::open(path).map_err(KitError::io(format!("open {}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(KitError::io(format!("read {}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::{Qemu, QemuConfig};
    use std::time::Duration;

    /// A menu on the serial console that halts: what a GRUB-based installer CD shows first.
    const CFG: &str = "serial --unit=0 --speed=115200\nterminal_input serial console\n\
terminal_output serial console\nset timeout=0\nmenuentry 'kiln-test' {\n  echo KILN-ISO-BOOTED\n  halt\n}\n";

    #[test]
    fn a_grub_iso_boots_from_a_cd_under_seabios_and_ovmf() {
        if let Some(why) = cannot_build() {
            return crate::skip(format!("cannot make an ISO: {why}"));
        }
        if !crate::qemu::qemu_available() {
            return crate::skip("qemu-system-x86_64 is not installed");
        }
        let work = tempfile::tempdir().unwrap();
        let marker = work.path().join("marker.txt");
        fs::write(&marker, "kiln\n").unwrap();
        let iso = grub_iso(CFG, &[("/kiln/marker.txt", &marker)]).unwrap();
        // Cached: the same inputs give the same file without making it again.
        let again = grub_iso(CFG, &[("/kiln/marker.txt", &marker)]).unwrap();
        assert_eq!(iso, again);
        // OVMF code and variables in one file, which `-bios` can load.
        let ovmf = Path::new("/usr/share/ovmf/OVMF.fd");
        for uefi in [false, true] {
            if uefi && !ovmf.is_file() {
                crate::skip("OVMF is not installed (Debian package ovmf): UEFI part skipped");
                continue;
            }
            let serial = work.path().join(format!("serial-{uefi}.log"));
            let mut cfg = QemuConfig::firmware(&serial).arg(cdrom_args(&iso));
            if uefi {
                cfg = cfg.arg(["-bios".to_string(), ovmf.display().to_string()]);
            }
            let mut q = Qemu::spawn(&cfg).unwrap();
            q.wait_for("KILN-ISO-BOOTED", Duration::from_secs(90))
                .unwrap_or_else(|e| panic!("uefi={uefi}: {e}"));
        }
    }
}
