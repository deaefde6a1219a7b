//! The EFI system partition: a FAT32 file system made in a file with `mkfs.vfat` and filled
//! with mtools, never mounted (build hosts may have no VFAT driver). kiln-disk's FAT writer
//! makes only FAT12 with files in the root folder; the ESP needs `EFI/BOOT/`.

use std::path::Path;
use std::process::Command;

use super::{run_logged, BootstrapError};

/// Makes `image` (`size` bytes) holding `EFI/BOOT/BOOTX64.EFI` from `loader`.
pub fn make(
    image: &Path,
    size: u64,
    volume_id: u32,
    loader: &Path,
    log: &Path,
) -> Result<(), BootstrapError> {
    let mut mkfs = Command::new("mkfs.vfat");
    mkfs.args(["-F", "32", "-n", "EFI", "-i"])
        .arg(format!("{volume_id:08x}"))
        .arg("-C")
        .arg(image)
        .arg((size >> 10).to_string());
    run_logged(mkfs, "mkfs.vfat (ESP)", "dosfstools", log)?;
    let i = image.display().to_string();
    let mut mmd = Command::new("mmd");
    mmd.env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &i, "::/EFI", "::/EFI/BOOT"]);
    run_logged(mmd, "mmd (ESP)", "mtools", log)?;
    let mut mcopy = Command::new("mcopy");
    mcopy
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &i])
        .arg(loader)
        .arg("::/EFI/BOOT/BOOTX64.EFI");
    run_logged(mcopy, "mcopy (ESP)", "mtools", log)
}
