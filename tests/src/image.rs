//! A disk image as the host's own tools see it: `qemu-img check` passes, and its content is
//! what `qemu-img convert` reads out of it. Tests compare that content with what a guest wrote.

use std::path::Path;
use std::process::Command;

use crate::{KitError, Result};

/// `qemu-img check` on `img`, then its whole virtual content, converted to raw by qemu-img in
/// `work` (the raw file is removed again). `Err`: qemu-img is missing, the check reports a
/// problem (with qemu-img's report), or the conversion fails.
pub fn checked_contents(img: &Path, work: &Path) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .map_err(KitError::io("running qemu-img check"))?;
    if !out.status.success() {
        return Err(KitError::Command {
            cmd: format!("qemu-img check {}", img.display()),
            detail: format!(
                "{}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    let name = img.file_name().unwrap_or(img.as_os_str()).to_string_lossy();
    let raw = work.join(format!("{name}.qemu-img.raw"));
    crate::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(img)
            .arg(&raw),
    )?;
    let data = std::fs::read(&raw).map_err(KitError::io(format!("reading {}", raw.display())))?;
    let _ = std::fs::remove_file(&raw);
    Ok(data)
}
