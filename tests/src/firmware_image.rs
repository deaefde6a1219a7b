//! Disk images that boot through firmware (issue 19's test images), made from Debian packages
//! and cached by their inputs in `<cache>/test-images/<kind>-<key>/disk.raw`.
//!
//! - [`uefi_xfs`]: GPT, an EFI system partition with GRUB at `EFI/BOOT/BOOTX64.EFI`, an XFS
//!   root, cloud-init. Boots with OVMF.
//! - [`bios_btrfs`]: MBR, GRUB for BIOS in the MBR gap, a btrfs root, cloud-init. Boots with
//!   SeaBIOS.
//! - [`uefi_secure`]: GPT, an ESP with Debian's signed shim at `EFI/BOOT/BOOTX64.EFI` and its
//!   signed GRUB beside it, an ext4 root with Debian's signed cloud kernel, cloud-init. Boots
//!   with OVMF's Secure Boot build and Microsoft's keys enrolled.
//! - [`uefi_unsigned`]: the same, but `EFI/BOOT/BOOTX64.EFI` is an unsigned GRUB, which Secure
//!   Boot refuses.
//!
//! The build hosts' kernels scan no partition tables and have no VFAT, so the root partition is
//! attached as its own loop device at its offset, the ESP is made in a file with `mkfs.vfat` and
//! mtools and copied into place, and the BIOS loader is written into the image file directly.
//! The signed loaders come from `apt-get download` of their packages, unpacked with `dpkg-deb`
//! (nothing is installed on the host).
//! Every mount and loop device is undone by a guard, also on error.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{cache_dir, is_root, on_path, run, KitError, Result};

/// Changes whenever the recipe below changes how an image is made, so old images are not reused.
const RECIPE_VERSION: &str = "fw-image-2";
const SUITE: &str = "bookworm";
const MIB: u64 = 1024 * 1024;
const DISK_MIB: u64 = 3072;
/// Both layouts start their first partition at 1 MiB: room for GRUB's BIOS core image.
const FIRST_MIB: u64 = 1;
const ESP_MIB: u64 = 100;
/// Packages every image has: the kernel kiln's tests use, an init and cloud-init.
const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "cloud-init",
];

/// The firmware an image boots with, and everything that shapes it.
struct Recipe {
    kind: &'static str,
    packages: &'static [&'static str],
    root_fs: &'static str,
    loader: Loader,
}

#[derive(Clone, Copy, PartialEq)]
enum Loader {
    /// GRUB from grub-mkstandalone at `EFI/BOOT/BOOTX64.EFI`.
    Uefi,
    Bios,
    /// Debian's signed GRUB at `EFI/BOOT/grubx64.efi`, reading `EFI/debian/grub.cfg`; with
    /// `signed`, Debian's signed shim at `EFI/BOOT/BOOTX64.EFI` to start it, else the unsigned
    /// GRUB of [`Loader::Uefi`] there.
    SecureBoot {
        signed: bool,
    },
}

const UEFI_XFS: Recipe = Recipe {
    kind: "uefi-xfs",
    packages: &["grub-efi-amd64-bin", "efibootmgr", "xfsprogs"],
    root_fs: "xfs",
    loader: Loader::Uefi,
};

const BIOS_BTRFS: Recipe = Recipe {
    kind: "bios-btrfs",
    packages: &["grub-pc-bin", "btrfs-progs"],
    root_fs: "btrfs",
    loader: Loader::Bios,
};

/// The signed kernel is the base's: Debian signs its cloud kernel too.
const UEFI_SECURE: Recipe = Recipe {
    kind: "uefi-secure",
    packages: &["efibootmgr"],
    root_fs: "ext4",
    loader: Loader::SecureBoot { signed: true },
};

const UEFI_UNSIGNED: Recipe = Recipe {
    loader: Loader::SecureBoot { signed: false },
    kind: "uefi-unsigned",
    ..UEFI_SECURE
};

/// Debian's signed boot chain: each package and the loader in it, as unpacked.
const SIGNED_SHIM: (&str, &str) = ("shim-signed", "usr/lib/shim/shimx64.efi.signed");
const SIGNED_GRUB: (&str, &str) = (
    "grub-efi-amd64-signed",
    "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
);

/// GRUB modules in the BIOS core image: enough to find the root and load normal mode from it.
const BIOS_CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "btrfs",
    "search",
    "search_fs_uuid",
];
/// GRUB modules the unsigned UEFI GRUB preloads; the rest (ext2 for an ext4 root, say) load
/// from its memdisk.
const UEFI_MODULES: &str = "part_gpt xfs search search_fs_uuid";

/// Host tools an image build runs, with the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("sfdisk", "fdisk"),
    ("losetup", "mount"),
    ("blkid", "util-linux"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("grub-mkimage", "grub-common"),
    ("grub-mkstandalone", "grub-common"),
    ("apt-get", "apt"),
    ("dpkg-deb", "dpkg"),
];

/// The UEFI image (GPT, ESP, XFS root); builds it on first use.
pub fn uefi_xfs() -> Result<PathBuf> {
    image(&UEFI_XFS)
}

/// The BIOS image (MBR, btrfs root); builds it on first use.
pub fn bios_btrfs() -> Result<PathBuf> {
    image(&BIOS_BTRFS)
}

/// The Secure Boot image (GPT, ESP with Debian's signed shim and GRUB, ext4 root); builds it
/// on first use.
pub fn uefi_secure() -> Result<PathBuf> {
    image(&UEFI_SECURE)
}

/// [`uefi_secure`]'s twin with an unsigned `EFI/BOOT/BOOTX64.EFI`; builds it on first use.
pub fn uefi_unsigned() -> Result<PathBuf> {
    image(&UEFI_UNSIGNED)
}

/// Why an image cannot be built here (not root, a tool or GRUB platform missing), if so.
pub fn cannot_build() -> Option<String> {
    if !is_root() {
        return Some("building firmware test images needs root (loop devices, mount)".into());
    }
    for (tool, package) in TOOLS {
        if !on_path(tool) {
            return Some(format!("`{tool}` is missing (Debian package {package})"));
        }
    }
    for dir in ["/usr/lib/grub/i386-pc", "/usr/lib/grub/x86_64-efi"] {
        if !Path::new(dir).is_dir() {
            return Some(format!(
                "{dir} is missing (grub-pc-bin, grub-efi-amd64-bin)"
            ));
        }
    }
    None
}

fn image(recipe: &Recipe) -> Result<PathBuf> {
    if let Some(why) = cannot_build() {
        return Err(KitError::Other(why));
    }
    let base = cache_dir().join("test-images");
    fs::create_dir_all(&base).map_err(KitError::io(format!("create {}", base.display())))?;
    let name = format!("{}-{}", recipe.kind, key(recipe)?);
    let dir = base.join(&name);
    let disk = dir.join("disk.raw");
    if disk.is_file() {
        return Ok(disk);
    }
    // One builder per image: others wait here and then find it built.
    let lock_path = base.join(format!("{name}.lock"));
    let lock = File::create(&lock_path)
        .map_err(KitError::io(format!("create {}", lock_path.display())))?;
    lock.lock()
        .map_err(KitError::io(format!("lock {}", lock_path.display())))?;
    if disk.is_file() {
        return Ok(disk);
    }
    // A fresh name: a folder left by a killed run may still hold its mounts.
    let work = TempDir(base.join(format!(
        ".tmp-{name}-{}-{}",
        std::process::id(),
        crate::kernel::nanos()
    )));
    fs::create_dir(&work.0).map_err(KitError::io(format!("create {}", work.0.display())))?;
    build(recipe, &work.0)?;
    fs::rename(&work.0, &dir).map_err(KitError::io(format!("rename into {}", dir.display())))?;
    Ok(disk)
}

/// A hash of everything that shapes the image: recipe version, suite, packages, the concrete
/// kernel package the metapackage resolves to today, the layout, the host's GRUB and the
/// versions of the signed loaders.
fn key(recipe: &Recipe) -> Result<String> {
    let kernel = crate::kernel::concrete_package(crate::kernel::METAPACKAGE)?;
    let grub = run(Command::new("grub-mkimage").arg("--version"))?;
    let mut text = format!(
        "{RECIPE_VERSION}\n{SUITE}\n{}\n{}\n{kernel}\n{}\n{}\n{grub}\n{}\n{UEFI_MODULES}\n{}",
        BASE_PACKAGES.join(","),
        recipe.packages.join(","),
        recipe.root_fs,
        layout(recipe.loader),
        BIOS_CORE_MODULES.join(","),
        early_config(recipe.loader, "<uuid>"),
    );
    // Only here, so the keys of the images without a signed chain stay as they were.
    if let Loader::SecureBoot { signed } = recipe.loader {
        text.push_str(&format!("\nsigned={signed}"));
        let chain = [SIGNED_SHIM, SIGNED_GRUB];
        let versions = candidates(&chain.map(|(package, _)| package))?;
        for ((package, file), version) in chain.iter().zip(versions) {
            text.push_str(&format!("\n{package}={version} {file}"));
        }
    }
    // FNV-1a: stable across Rust releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// The version `apt-get download` fetches of each package, in one `apt-cache` call (it takes
/// seconds on a loaded host).
fn candidates(packages: &[&str]) -> Result<Vec<String>> {
    let out = run(Command::new("apt-cache").arg("policy").args(packages))?;
    packages
        .iter()
        .map(|package| {
            let header = format!("{package}:");
            out.lines()
                .skip_while(|l| l.trim_end() != header)
                .skip(1)
                .take_while(|l| l.starts_with(' '))
                .filter_map(|l| l.trim().strip_prefix("Candidate:"))
                .map(str::trim)
                .find(|v| *v != "(none)")
                .map(str::to_string)
                .ok_or_else(|| KitError::Other(format!("apt-cache knows no version of {package}")))
        })
        .collect()
}

/// The sfdisk script.
fn layout(loader: Loader) -> String {
    let (root_start, root_size) = root_extent(loader);
    match loader {
        Loader::Uefi | Loader::SecureBoot { .. } => format!(
            "label: gpt\n\
             start={}MiB, size={ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
             start={}MiB, size={}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
            FIRST_MIB,
            root_start / MIB,
            root_size / MIB
        ),
        Loader::Bios => format!(
            "label: dos\nstart={}MiB, size={}MiB, type=83, bootable\n",
            root_start / MIB,
            root_size / MIB
        ),
    }
}

/// Offset and size of the root partition in bytes; 1 MiB is left at the end for GPT's backup.
fn root_extent(loader: Loader) -> (u64, u64) {
    let start = match loader {
        Loader::Uefi | Loader::SecureBoot { .. } => FIRST_MIB + ESP_MIB,
        Loader::Bios => FIRST_MIB,
    };
    (start * MIB, (DISK_MIB - 1 - start) * MIB)
}

fn build(recipe: &Recipe, work: &Path) -> Result<()> {
    let disk = work.join("disk.raw");
    let log = work.join("build.log");
    File::create(&disk)
        .and_then(|f| f.set_len(DISK_MIB * MIB))
        .map_err(KitError::io(format!("create {}", disk.display())))?;
    let script = layout(recipe.loader);
    logged(
        Command::new("sfdisk").arg("--no-reread").arg(&disk),
        Some(&script),
        &log,
    )?;

    let (offset, size) = root_extent(recipe.loader);
    let root_uuid;
    let release;
    {
        let root_dev = Loop::attach(&disk, offset, size)?;
        let mkfs = format!("mkfs.{}", recipe.root_fs);
        // Overwrite whatever is there: mke2fs spells it -F, the others -f.
        let force = if recipe.root_fs.starts_with("ext") {
            "-F"
        } else {
            "-f"
        };
        logged(Command::new(&mkfs).arg(force).arg(&root_dev.0), None, &log)?;
        root_uuid = run(Command::new("blkid")
            .args(["-s", "UUID", "-o", "value"])
            .arg(&root_dev.0))?
        .trim()
        .to_string();
        let mnt = work.join("root");
        fs::create_dir_all(&mnt).map_err(KitError::io("create mount point"))?;
        let mounted = Mount::new(&root_dev.0, &mnt)?;
        bootstrap(recipe, &mounted.0, &log)?;
        release = kernel_release(&mounted.0)?;
        write_boot_config(recipe, &mounted.0, &root_uuid, &release)?;
        if recipe.loader == Loader::Bios {
            // GRUB's normal mode and its modules load from the root, as grub-install puts them.
            let to = mounted.0.join("boot/grub");
            logged(
                Command::new("cp")
                    .arg("-r")
                    .arg("/usr/lib/grub/i386-pc")
                    .arg(&to),
                None,
                &log,
            )?;
        }
    }

    let early = work.join("early.cfg");
    write(&early, &early_config(recipe.loader, &root_uuid))?;
    match recipe.loader {
        Loader::Uefi => install_uefi(work, &disk, &early, &log),
        Loader::SecureBoot { signed } => install_signed(signed, work, &disk, &early, &log),
        Loader::Bios => install_bios(work, &disk, &early, &log),
    }
}

/// GRUB's first config, built into the loader: find the root by its UUID, then its menu.
fn early_config(loader: Loader, root_uuid: &str) -> String {
    let search = format!("search --no-floppy --fs-uuid --set=root {root_uuid}\n");
    match loader {
        // Runs as the memdisk's menu (the prefix stays in the memdisk, which has the modules),
        // or from the ESP as the signed GRUB's config (its modules are all built in).
        Loader::Uefi | Loader::SecureBoot { .. } => {
            format!("{search}configfile ($root)/boot/grub/grub.cfg\n")
        }
        // Runs before normal mode, which is loaded from the prefix and reads its grub.cfg.
        Loader::Bios => format!("{search}set prefix=($root)/boot/grub\n"),
    }
}

/// The root file system, written straight into the mounted partition.
fn bootstrap(recipe: &Recipe, root: &Path, log: &Path) -> Result<()> {
    let packages: Vec<&str> = BASE_PACKAGES
        .iter()
        .chain(recipe.packages)
        .copied()
        .collect();
    // The distro initrd must mount the root itself: add its file system's module by name.
    let hook = format!(
        "echo {} >> \"$1/etc/initramfs-tools/modules\" && chroot \"$1\" update-initramfs -u -k all",
        recipe.root_fs
    );
    logged(
        Command::new("mmdebstrap")
            .arg("--variant=minbase")
            .arg("--mode=root")
            .arg(format!("--include={}", packages.join(",")))
            .arg(format!("--customize-hook={hook}"))
            .arg(SUITE)
            .arg(root),
        None,
        log,
    )
}

fn kernel_release(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    fs::read_dir(&boot)
        .map_err(KitError::io(format!("list {}", boot.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .next()
        .ok_or_else(|| KitError::Other(format!("no vmlinuz-* in {}", boot.display())))
}

/// fstab, hostname and GRUB's menu, with the serial console the boot tests read.
fn write_boot_config(recipe: &Recipe, root: &Path, uuid: &str, release: &str) -> Result<()> {
    let pass = if recipe.root_fs == "btrfs" { 0 } else { 1 };
    write(
        &root.join("etc/fstab"),
        &format!("UUID={uuid} / {} defaults 0 {pass}\n", recipe.root_fs),
    )?;
    write(&root.join("etc/hostname"), &format!("{}\n", recipe.kind))?;
    let grub = root.join("boot/grub");
    fs::create_dir_all(&grub).map_err(KitError::io(format!("create {}", grub.display())))?;
    write(
        &grub.join("grub.cfg"),
        &format!(
            "set timeout=0\n\
             serial --unit=0 --speed=115200\n\
             terminal_input serial console\n\
             terminal_output serial console\n\
             menuentry 'Debian GNU/Linux' {{\n\
             \x20 linux /boot/vmlinuz-{release} root=UUID={uuid} ro console=ttyS0,115200 no_timer_check\n\
             \x20 initrd /boot/initrd.img-{release}\n\
             }}\n"
        ),
    )
}

/// `EFI/BOOT/BOOTX64.EFI`: GRUB with its modules in a memdisk.
fn install_uefi(work: &Path, disk: &Path, early: &Path, log: &Path) -> Result<()> {
    let efi = standalone_grub(work, early, log)?;
    write_esp(work, disk, &[(&efi, "EFI/BOOT/BOOTX64.EFI")], log)?;
    let _ = fs::remove_file(&efi);
    Ok(())
}

/// Debian's signed chain: GRUB where shim looks for it (beside itself) and its config where
/// GRUB looks for it (`$prefix` = `/EFI/debian` on the ESP), shim or an unsigned GRUB first.
fn install_signed(signed: bool, work: &Path, disk: &Path, early: &Path, log: &Path) -> Result<()> {
    let tree = work.join("signed");
    for (package, _) in [SIGNED_SHIM, SIGNED_GRUB] {
        unpack_package(package, work, &tree, log)?;
    }
    let grub = tree.join(SIGNED_GRUB.1);
    let first = if signed {
        tree.join(SIGNED_SHIM.1)
    } else {
        standalone_grub(work, early, log)?
    };
    write_esp(
        work,
        disk,
        &[
            (&first, "EFI/BOOT/BOOTX64.EFI"),
            (&grub, "EFI/BOOT/grubx64.efi"),
            (early, "EFI/debian/grub.cfg"),
        ],
        log,
    )?;
    let _ = fs::remove_dir_all(&tree);
    Ok(())
}

/// `apt-get download` a package into `work` and unpack it into `tree`.
fn unpack_package(package: &str, work: &Path, tree: &Path, log: &Path) -> Result<()> {
    let debs = work.join("debs");
    fs::create_dir_all(&debs).map_err(KitError::io(format!("create {}", debs.display())))?;
    logged(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&debs),
        None,
        log,
    )?;
    let prefix = format!("{package}_");
    let deb = fs::read_dir(&debs)
        .map_err(KitError::io(format!("list {}", debs.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| KitError::Other(format!("apt-get download {package} left no .deb")))?;
    logged(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tree),
        None,
        log,
    )?;
    let _ = fs::remove_file(&deb);
    Ok(())
}

/// GRUB for UEFI in one unsigned file, its modules and `early` config in a memdisk.
fn standalone_grub(work: &Path, early: &Path, log: &Path) -> Result<PathBuf> {
    let efi = work.join("BOOTX64.EFI");
    logged(
        Command::new("grub-mkstandalone")
            .args(["-O", "x86_64-efi"])
            .arg(format!("--modules={UEFI_MODULES}"))
            .arg("-o")
            .arg(&efi)
            .arg(format!("boot/grub/grub.cfg={}", early.display())),
        None,
        log,
    )?;
    Ok(efi)
}

/// A FAT ESP holding `files` (source, path on the ESP), made in a file with mtools and copied
/// into the ESP's place: the host cannot mount FAT.
fn write_esp(work: &Path, disk: &Path, files: &[(&Path, &str)], log: &Path) -> Result<()> {
    let esp = work.join("esp.img");
    logged(
        Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "EFI", "-C"])
            .arg(&esp)
            .arg((ESP_MIB * 1024).to_string()),
        None,
        log,
    )?;
    let i = esp.display().to_string();
    // Every folder the files are in, parents first, each once.
    let mut dirs: Vec<String> = Vec::new();
    for (_, to) in files {
        let parts: Vec<&str> = to.split('/').collect();
        for n in 1..parts.len() {
            let dir = format!("::/{}", parts[..n].join("/"));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    logged(Command::new("mmd").args(["-i", &i]).args(&dirs), None, log)?;
    for (from, to) in files {
        logged(
            Command::new("mcopy")
                .args(["-i", &i])
                .arg(from)
                .arg(format!("::/{to}")),
            None,
            log,
        )?;
    }
    let mut from = File::open(&esp).map_err(KitError::io("open esp.img"))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(KitError::io("open disk"))?;
    to.seek(SeekFrom::Start(FIRST_MIB * MIB))
        .map_err(KitError::io("seek disk"))?;
    std::io::copy(&mut from, &mut to).map_err(KitError::io("copy ESP into disk"))?;
    let _ = fs::remove_file(&esp);
    Ok(())
}

/// GRUB's boot.img in the MBR's code area and its core.img in the gap before the first
/// partition, as grub-bios-setup places them, without needing a whole-disk device.
fn install_bios(work: &Path, disk: &Path, early: &Path, log: &Path) -> Result<()> {
    let core = work.join("core.img");
    logged(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-p", "/boot/grub", "-c"])
            .arg(early)
            .arg("-o")
            .arg(&core)
            .args(BIOS_CORE_MODULES),
        None,
        log,
    )?;
    let core_bytes = fs::read(&core).map_err(KitError::io("read core.img"))?;
    if core_bytes.len() as u64 > FIRST_MIB * MIB - 512 {
        return Err(KitError::Other(format!(
            "core.img is {} bytes, more than the gap before the first partition",
            core_bytes.len()
        )));
    }
    let mut boot = [0u8; 512];
    File::open("/usr/lib/grub/i386-pc/boot.img")
        .and_then(|mut f| f.read_exact(&mut boot))
        .map_err(KitError::io("read boot.img"))?;
    // As grub-bios-setup does for a hard disk: skip boot.img's floppy probing.
    boot[0x66] = 0x90;
    boot[0x67] = 0x90;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(KitError::io("open disk"))?;
    // Only the code area: the partition table sfdisk wrote stays. boot.img loads sector 1,
    // whose blocklist (set by grub-mkimage) loads the rest of core.img from sector 2.
    f.write_all(&boot[..440])
        .and_then(|_| f.seek(SeekFrom::Start(512)).map(|_| ()))
        .and_then(|_| f.write_all(&core_bytes))
        .map_err(KitError::io("write GRUB into the disk"))?;
    let _ = fs::remove_file(&core);
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(KitError::io(format!("write {}", path.display())))
}

/// Run a command with its output appended to the build log; on failure the log's tail is in
/// the error.
fn logged(cmd: &mut Command, stdin: Option<&str>, log: &Path) -> Result<()> {
    let shown = format!("{cmd:?}");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(KitError::io(format!("open {}", log.display())))?;
    let _ = writeln!(f, "$ {shown}");
    let f2 = f.try_clone().map_err(KitError::io("clone log"))?;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| KitError::Command {
            cmd: shown.clone(),
            detail: e.to_string(),
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        let _ = input.write_all(text.as_bytes());
    }
    let status = child.wait().map_err(KitError::io("wait"))?;
    if status.success() {
        return Ok(());
    }
    let tail: String = fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(KitError::Command {
        cmd: shown,
        detail: format!("{status}; log {}:\n{tail}", log.display()),
    })
}

/// A loop device over part of a file; detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, offset: u64, size: u64) -> Result<Loop> {
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(size.to_string())
            .arg(file))?;
        Ok(Loop(PathBuf::from(dev.trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mounted file system; unmounted on drop (lazily if something still holds it, so no mount
/// outlives the test).
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &Path, at: &Path) -> Result<Mount> {
        run(Command::new("mount").arg(dev).arg(at))?;
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // mmdebstrap's hooks mount /proc, /sys and /dev inside; it unmounts them, but a failed
        // run may not have.
        let _ = Command::new("umount").arg("-R").arg(&self.0).status();
        if is_mounted(&self.0) {
            let _ = Command::new("umount")
                .arg("-R")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(p.as_str())))
        .unwrap_or(false)
}

/// A build folder removed on drop; after the rename into the cache it no longer exists.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never delete through a mount that failed to go away (it could be a bind of /dev).
        let p = format!("{}/", self.0.display());
        let held = fs::read_to_string("/proc/self/mounts")
            .map(|m| {
                m.lines()
                    .filter_map(|l| l.split(' ').nth(1))
                    .any(|at| at.starts_with(&p))
            })
            .unwrap_or(true);
        if held {
            eprintln!("leaving {} in place: something is still mounted in it", p);
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_leave_the_bios_gap_and_fit_the_disk() {
        for loader in [
            Loader::Uefi,
            Loader::Bios,
            Loader::SecureBoot { signed: true },
        ] {
            let (start, size) = root_extent(loader);
            assert!(start >= MIB);
            assert!(start + size < DISK_MIB * MIB);
        }
        assert!(layout(Loader::Uefi).contains("label: gpt"));
        assert!(layout(Loader::Bios).contains("label: dos"));
    }
}
