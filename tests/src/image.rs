//! A disk image as the host's own tools see it: `qemu-img check` passes, and its content is
//! what `qemu-img convert` reads out of it. Tests compare that content with what a guest wrote.
//! [`ext4_root`] names a raw image's ext4 root for debugfs, partitioned or not.

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

/// The x86-64 root partition type of the Discoverable Partitions spec, as GPT stores it.
const GPT_ROOT_X86_64: [u8; 16] = [
    0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
];

/// What debugfs opens for a raw image's ext4 root: `raw?offset=N` when the image is a GPT
/// disk with an x86-64 root partition (kiln's bootstrapped bases), the whole file when it has
/// no GPT (a bare file system).
pub fn ext4_root(raw: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| KitError::Other(format!("{}: {what}", raw.display()));
    let f = std::fs::File::open(raw).map_err(KitError::io(format!("open {}", raw.display())))?;
    let mut head = vec![0u8; 34 * 512];
    f.read_exact_at(&mut head, 0)
        .map_err(KitError::io(format!("read {}", raw.display())))?;
    let h = &head[512..1024];
    if &h[..8] != b"EFI PART" {
        return Ok(raw.display().to_string());
    }
    let le32 = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let le64 = |b: &[u8], at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    let (count, size) = (le32(80) as usize, le32(84) as usize);
    if !(128..=4096).contains(&size) || count > 1024 {
        return Err(bad("GPT header with an odd entry table"));
    }
    let mut table = vec![0u8; count * size];
    f.read_exact_at(&mut table, le64(h, 72).saturating_mul(512))
        .map_err(KitError::io(format!(
            "read GPT entries of {}",
            raw.display()
        )))?;
    table
        .chunks(size)
        .find(|e| e[..16] == GPT_ROOT_X86_64)
        .map(|e| format!("{}?offset={}", raw.display(), le64(e, 32) * 512))
        .ok_or_else(|| bad("GPT without an x86-64 root partition"))
}
