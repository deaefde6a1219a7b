//! GRUB for both firmwares, installed without a loop device or grub-install:
//! - BIOS: `boot.img` in the MBR's code area, patched to load `core.img` (made with
//!   `grub-mkimage -O i386-pc`) from the BIOS boot partition, as grub-bios-setup does; GRUB's
//!   modules go to the root's `/boot/grub/i386-pc`, where the core image's prefix points.
//! - UEFI: `EFI/BOOT/BOOTX64.EFI` made by `grub-mkstandalone -O x86_64-efi` (modules in its
//!   memdisk), the removable-media path every UEFI firmware tries without NVRAM entries.
//!
//! Both start from a small built-in config that finds the root by file-system UUID and reads
//! the root's `/boot/grub/grub.cfg`, which boots Debian's `/vmlinuz` and `/initrd.img`
//! symlinks: a kernel upgraded inside the guest is the one booted next.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::{run_logged, BootstrapError};
use crate::path_io::PathIoError;

/// The host's GRUB files for BIOS (grub-pc-bin).
pub const I386_PC_DIR: &str = "/usr/lib/grub/i386-pc";
/// The host's GRUB modules for UEFI (grub-efi-amd64-bin).
pub const X86_64_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// Modules built into the BIOS core image: enough to find the root and load the rest
/// (normal mode, linux) from its `/boot/grub/i386-pc`. `search` is the command the early
/// config runs (`search_fs_uuid` is only its `--fs-uuid` backend): without it GRUB stops at
/// its rescue prompt.
const BIOS_CORE_MODULES: &[&str] = &["biosdisk", "part_gpt", "ext2", "search", "search_fs_uuid"];
/// Modules the UEFI loader preloads (the rest are in its memdisk).
const UEFI_MODULES: &str = "part_gpt ext2 search search_fs_uuid";

/// boot.img fields (GRUB's `boot.S`): the 64-bit sector the core image starts at, and the
/// jump that grub-bios-setup turns into NOPs for hard disks (it would otherwise probe the
/// BIOS drive number as if the disk could be a floppy).
const KERNEL_SECTOR_AT: usize = 0x5c;
const DRIVE_CHECK_AT: usize = 0x66;
/// The MBR's boot code ends where the disk signature and partition table start.
pub const MBR_CODE_LEN: usize = 440;
/// diskboot.img (the core image's first sector) ends with its block list: the first entry's
/// 64-bit start sector sits 12 bytes before the sector's end.
const BLOCKLIST_START_AT: usize = 512 - 12;

/// The kernel command line for a firmware boot: the root by UUID and both consoles (the
/// serial one last, so systemd's status goes there), as kiln's direct boot does; no
/// `systemd.hostname=` (a deployed VM names itself) and no `panic=-1` (that is for builds).
/// `no_timer_check`: on a busy host a virtual CPU can miss the kernel's early timer check.
pub fn kernel_args(root_uuid: &str) -> String {
    format!("root=UUID={root_uuid} rw console=tty0 console=ttyS0,115200 no_timer_check")
}

/// The root's `/boot/grub/grub.cfg`.
pub fn grub_cfg(root_uuid: &str) -> String {
    format!(
        "# kiln: boots Debian's /vmlinuz and /initrd.img links, so an upgraded kernel boots.\n\
         set timeout=1\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         search --no-floppy --fs-uuid --set=root {root_uuid}\n\
         menuentry 'Debian GNU/Linux' {{\n\
         \x20 linux /vmlinuz {}\n\
         \x20 initrd /initrd.img\n\
         }}\n",
        kernel_args(root_uuid)
    )
}

/// The config built into the BIOS core image: runs before normal mode, which then loads
/// from the prefix and reads its grub.cfg.
pub fn bios_early_cfg(root_uuid: &str) -> String {
    format!("search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n")
}

/// The config of the UEFI loader's memdisk: its prefix stays the memdisk (which has the
/// modules), the menu comes from the root.
pub fn uefi_early_cfg(root_uuid: &str) -> String {
    format!(
        "search --no-floppy --fs-uuid --set=root {root_uuid}\n\
         configfile ($root)/boot/grub/grub.cfg\n"
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("boot.img is {0} bytes, not one 512-byte sector")]
    BootImage(usize),
    #[error("core.img is {size} bytes, more than the {room}-byte BIOS boot partition")]
    CoreTooLarge { size: usize, room: u64 },
    #[error("core.img is {0} bytes, less than one sector")]
    CoreTooSmall(usize),
}

/// The MBR code area for a core image at `core_lba`: GRUB's boot.img with the core's sector
/// and the hard-disk jump patched, as grub-bios-setup writes it. Only these 440 bytes go to
/// the disk: the rest of sector 0 is the (protective) partition table.
pub fn patch_boot_sector(boot_img: &[u8], core_lba: u64) -> Result<[u8; MBR_CODE_LEN], PatchError> {
    if boot_img.len() != 512 {
        return Err(PatchError::BootImage(boot_img.len()));
    }
    let mut code = [0u8; MBR_CODE_LEN];
    code.copy_from_slice(&boot_img[..MBR_CODE_LEN]);
    code[KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8].copy_from_slice(&core_lba.to_le_bytes());
    code[DRIVE_CHECK_AT] = 0x90;
    code[DRIVE_CHECK_AT + 1] = 0x90;
    Ok(code)
}

/// Points the core image's first block list entry at the sector after its first one (where
/// the rest of it is, when the whole image starts at `core_lba`). grub-mkimage sets the
/// entry's length; its start assumes the core image sits at sector 1 (the MBR gap).
pub fn patch_core_blocklist(core: &mut [u8], core_lba: u64, room: u64) -> Result<(), PatchError> {
    if core.len() < 512 {
        return Err(PatchError::CoreTooSmall(core.len()));
    }
    if core.len() as u64 > room {
        return Err(PatchError::CoreTooLarge {
            size: core.len(),
            room,
        });
    }
    core[BLOCKLIST_START_AT..BLOCKLIST_START_AT + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    Ok(())
}

/// The GRUB module folders installing GRUB needs that the host lacks, with their packages.
pub fn missing_tools() -> Vec<(String, String)> {
    [
        (I386_PC_DIR, "grub-pc-bin"),
        (X86_64_EFI_DIR, "grub-efi-amd64-bin"),
    ]
    .into_iter()
    .filter(|(path, _)| !Path::new(path).is_dir())
    .map(|(path, package)| (path.to_string(), package.to_string()))
    .collect()
}

/// Builds GRUB's BIOS core image in `work` and returns its bytes.
pub fn bios_core(work: &Path, root_uuid: &str, log: &Path) -> Result<Vec<u8>, BootstrapError> {
    let cfg = work.join("grub-bios-early.cfg");
    fs::write(&cfg, bios_early_cfg(root_uuid)).map_err(PathIoError::at("writing", &cfg))?;
    let core = work.join("core.img");
    let mut cmd = Command::new("grub-mkimage");
    cmd.args(["-O", "i386-pc", "-p", "/boot/grub", "-d", I386_PC_DIR, "-c"])
        .arg(&cfg)
        .arg("-o")
        .arg(&core)
        .args(BIOS_CORE_MODULES);
    run_logged(cmd, "grub-mkimage (BIOS)", "grub-common", log)?;
    fs::read(&core).map_err(|e| PathIoError::at("reading", &core)(e).into())
}

/// GRUB's boot.img from the host.
pub fn boot_img() -> Result<Vec<u8>, BootstrapError> {
    let p = Path::new(I386_PC_DIR).join("boot.img");
    fs::read(&p).map_err(|e| PathIoError::at("reading", &p)(e).into())
}

/// Builds the standalone UEFI loader in `work` and returns its path.
pub fn uefi_loader(
    work: &Path,
    root_uuid: &str,
    log: &Path,
) -> Result<std::path::PathBuf, BootstrapError> {
    let cfg = work.join("grub-uefi-early.cfg");
    fs::write(&cfg, uefi_early_cfg(root_uuid)).map_err(PathIoError::at("writing", &cfg))?;
    let efi = work.join("BOOTX64.EFI");
    let mut cmd = Command::new("grub-mkstandalone");
    cmd.args(["-O", "x86_64-efi", "-d", X86_64_EFI_DIR])
        .arg(format!("--modules={UEFI_MODULES}"))
        .arg("-o")
        .arg(&efi)
        .arg(format!("boot/grub/grub.cfg={}", cfg.display()));
    run_logged(cmd, "grub-mkstandalone (UEFI)", "grub-common", log)?;
    Ok(efi)
}

/// Puts the root's GRUB files in place: its menu and the BIOS modules normal mode loads.
pub fn install_into_root(root: &Path, root_uuid: &str, log: &Path) -> Result<(), BootstrapError> {
    let dir = root.join("boot/grub");
    fs::create_dir_all(&dir).map_err(PathIoError::at("creating", &dir))?;
    let cfg = dir.join("grub.cfg");
    fs::write(&cfg, grub_cfg(root_uuid)).map_err(PathIoError::at("writing", &cfg))?;
    let mut cp = Command::new("cp");
    cp.arg("-r").arg(I386_PC_DIR).arg(dir.join("i386-pc"));
    run_logged(cp, "copying GRUB's BIOS modules", "coreutils", log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_boot_img() -> Vec<u8> {
        let mut b: Vec<u8> = (0..512).map(|i| i as u8).collect();
        b[KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8].copy_from_slice(&1u64.to_le_bytes());
        b[DRIVE_CHECK_AT] = 0xeb;
        b[DRIVE_CHECK_AT + 1] = 0x05;
        b
    }

    #[test]
    fn boot_sector_points_at_the_core_and_skips_the_floppy_probe() {
        let img = fake_boot_img();
        let code = patch_boot_sector(&img, 2048).unwrap();
        assert_eq!(
            &code[KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8],
            &2048u64.to_le_bytes()
        );
        assert_eq!(&code[DRIVE_CHECK_AT..DRIVE_CHECK_AT + 2], &[0x90, 0x90]);
        // Everything else is boot.img's, byte for byte.
        for (i, (a, b)) in code.iter().zip(&img).enumerate() {
            if !(KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8).contains(&i)
                && !(DRIVE_CHECK_AT..DRIVE_CHECK_AT + 2).contains(&i)
            {
                assert_eq!(a, b, "byte {i:#x}");
            }
        }
        assert_eq!(
            patch_boot_sector(&img[..400], 2048),
            Err(PatchError::BootImage(400))
        );
    }

    #[test]
    fn core_blocklist_starts_after_its_first_sector() {
        let mut core = vec![0u8; 62 * 512];
        // grub-mkimage's defaults: start at sector 2, 61 more sectors.
        core[500..508].copy_from_slice(&2u64.to_le_bytes());
        core[508..510].copy_from_slice(&61u16.to_le_bytes());
        patch_core_blocklist(&mut core, 2048, 1 << 20).unwrap();
        assert_eq!(&core[500..508], &2049u64.to_le_bytes());
        assert_eq!(&core[508..510], &61u16.to_le_bytes(), "length untouched");
        assert_eq!(
            patch_core_blocklist(&mut core, 2048, 4096),
            Err(PatchError::CoreTooLarge {
                size: 62 * 512,
                room: 4096
            })
        );
        assert_eq!(
            patch_core_blocklist(&mut [0u8; 100], 2048, 4096),
            Err(PatchError::CoreTooSmall(100))
        );
    }

    #[test]
    fn configs_name_the_root_by_uuid_and_boot_the_links() {
        let u = "0b5f0c1e-7c38-4c3c-9d9e-1f2a3b4c5d6e";
        let cfg = grub_cfg(u);
        assert!(cfg.contains("linux /vmlinuz root=UUID=0b5f0c1e-"), "{cfg}");
        assert!(cfg.contains("initrd /initrd.img\n"), "{cfg}");
        assert!(cfg.contains("console=tty0 console=ttyS0,115200"), "{cfg}");
        assert!(bios_early_cfg(u).contains("--fs-uuid --set=root 0b5f0c1e-"));
        assert!(bios_early_cfg(u).contains("set prefix=($root)/boot/grub"));
        assert!(uefi_early_cfg(u).contains("configfile ($root)/boot/grub/grub.cfg"));
    }

    #[test]
    fn real_boot_img_patches_like_grub_bios_setup() {
        // GRUB's own boot.img, when the host has it: the fields are where boot.S puts them.
        let Ok(img) = boot_img() else {
            eprintln!("SKIP: {I386_PC_DIR}/boot.img is missing (grub-pc-bin)");
            return;
        };
        assert_eq!(
            &img[KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8],
            &1u64.to_le_bytes()
        );
        assert_eq!(
            img[DRIVE_CHECK_AT], 0xeb,
            "the jump grub-bios-setup NOPs out"
        );
        let code = patch_boot_sector(&img, 2048).unwrap();
        assert_eq!(
            &code[KERNEL_SECTOR_AT..KERNEL_SECTOR_AT + 8],
            &2048u64.to_le_bytes()
        );
    }
}
