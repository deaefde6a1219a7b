//! `bootstrap` sources: a Debian root built from packages with mmdebstrap, with the distro
//! kernel and kiln's agent installed, made into a disk that boots anywhere and cached by its
//! inputs.
//!
//! The recipe (bump [`RECIPE_VERSION`] whenever it changes what lands in the image):
//! 1. `mmdebstrap --variant=minbase --include=systemd-sysv,udev,linux-image-cloud-amd64,<pkgs>
//!    <suite> <dir> [mirror]` as root (no unshare needed); the source's `kernel` replaces the
//!    cloud kernel package.
//! 2. Customize the root: the agent binary and its systemd unit (enabled), `/etc/fstab` with the
//!    root by file-system UUID and `x-systemd.growfs`, a `systemd-repart` entry that grows the
//!    root partition to the disk's end at boot (before growfs grows ext4), so a clone on a
//!    bigger disk gets the room; no `/etc/hostname` (the VM's name comes from
//!    `systemd.hostname=` on the command line), an empty machine-id, DHCP on every NIC with
//!    systemd-networkd, names through systemd-resolved (VM names are single labels), GRUB's
//!    menu and BIOS modules in `/boot/grub` ([`grub`]); generators and timers a VM never
//!    needs turned off ([`QUIET_GENERATORS`], [`IDLE_UNITS`]).
//! 3. Record the package versions (`dpkg-query --admindir`), copy the kernel out of `/boot`
//!    for kiln's direct boot, with kiln's minimal initramfs ([`initrd`]: klibc, the disk and
//!    vsock drivers) beside it; the root keeps Debian's `MODULES=most` initrd for GRUB.
//! 4. The disk ([`layout`]): GPT with a BIOS boot partition (GRUB's core image), an EFI system
//!    partition ([`esp`], GRUB at `EFI/BOOT/BOOTX64.EFI`) and the ext4 root last, made by
//!    `mkfs.ext4 -d` straight at its offset in the raw file; boot.img in the MBR. No loop
//!    device, no mount. Every GUID and UUID comes from the cache key. Then convert to qcow2.
//! 5. Rename the finished folder into `bootstrap/<key>`; the key is the SHA-256 of the inputs.

pub mod esp;
pub mod grub;
pub mod initrd;
pub mod layout;

use crate::path_io::PathIoError;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cache::{sha256_bytes, sha256_file, Cache};
use crate::events::{Event, EventSink};
use crate::job::BootstrapSpec;

/// Changes whenever the recipe changes what lands in the image, so old cache entries are not
/// reused for a different recipe.
pub const RECIPE_VERSION: u32 = 13;

/// Packages every bootstrapped root gets besides its kernel: an init, udev for device nodes
/// and module loading, and a resolver that takes the DNS server from the DHCP lease.
pub const BASE_PACKAGES: &[&str] = &["systemd-sysv", "udev", "systemd-resolved"];

/// The kernel package unless the source names another (`kernel`): Debian's cloud kernel, the
/// smallest with the virtio drivers. Exactly one kernel is installed, so `/boot` holds no
/// second kernel for the boot to pick by mistake.
pub const DEFAULT_KERNEL: &str = "linux-image-cloud-amd64";

/// The agent's vsock port.
pub const AGENT_VSOCK_PORT: u32 = kiln_agent::VSOCK_PORT;

const NETWORK_UNIT: &str = "# kiln: DHCP on every virtio NIC of the build network.
[Match]
Name=en* eth*

[Network]
DHCP=yes
";

/// systemd-repart (in bookworm's systemd, run at every boot when a definition exists) grows
/// the root partition, the disk's last, into free space after it, moving GPT's backup header
/// to the disk's new end; `x-systemd.growfs` then grows ext4 (ordered after repart).
const REPART_ROOT: &str = "# kiln: grow the root partition to the end of the disk at boot.
[Partition]
Type=root-x86-64
";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("bootstrap supports distro `debian` only, not `{0}`")]
    Distro(String),
    #[error("bootstrap package name `{0}` is not a Debian package name")]
    PackageName(String),
    #[error("bootstrap kernel `{0}` is not a Debian kernel package (linux-image-...)")]
    Kernel(String),
    #[error("bootstrap suite `{0}` is not a Debian suite name")]
    Suite(String),
    #[error("mirror `{0}` must be an http(s):// URL")]
    Mirror(String),
    #[error(
        "bootstrapping needs root (mmdebstrap, mkfs.ext4 -d with file owners); run kiln as root"
    )]
    NotRoot,
    #[error("the guest agent: {0}")]
    NoAgent(#[from] crate::agent_binary::AgentBinaryError),
    #[error("`{tool}` is not installed (Debian package `{package}`)")]
    MissingTool { tool: String, package: String },
    #[error("{what} failed ({status}); last output:\n{tail}\nfull log: {log}")]
    Tool {
        what: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error("the bootstrapped root has no kernel or initrd in /boot")]
    NoKernel,
    #[error("bootstrap cache entry {path}: {reason}")]
    BadEntry { path: PathBuf, reason: String },
    #[error("cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error("converting the bootstrap disk: {0}")]
    Convert(String),
    #[error("installing GRUB for BIOS: {0}")]
    BiosLoader(#[from] grub::PatchError),
    #[error("the bootstrapped root has no /{0}: the kernel package made no link to boot")]
    NoKernelLink(&'static str),
}

/// Host tools a bootstrap runs, with the Debian package of each: checked before mmdebstrap
/// so a missing one fails at once, not after the download.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("grub-mkimage", "grub-common"),
    ("grub-mkstandalone", "grub-common"),
];

/// Everything the cache key covers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapInputs {
    pub recipe: u32,
    pub distro: String,
    pub suite: String,
    /// Sorted and deduplicated, base packages included.
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    pub agent_sha256: String,
    pub agent_unit_sha256: String,
}

impl BootstrapInputs {
    /// The cache key: SHA-256 of the canonical JSON of the inputs.
    pub fn key(&self) -> String {
        // Serializing a plain struct of strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        sha256_bytes(&json)
    }
}

/// What a finished bootstrap entry records (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapMeta {
    pub key: String,
    pub inputs: BootstrapInputs,
    /// Installed packages and versions, from dpkg in the root.
    pub package_versions: BTreeMap<String, String>,
    pub kernel_version: String,
    pub root_device: String,
    pub disk_sha256: String,
    pub disk_virtual_size: u64,
    pub build_seconds: f64,
    /// Whether `initrd.img` is kiln's minimal direct-boot initramfs ([`initrd`]) rather than
    /// a copy of the distro's.
    #[serde(default)]
    pub minimal_initrd: bool,
}

/// A ready bootstrap entry.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub meta: BootstrapMeta,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// The agent binary and unit installed into bootstrapped roots.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    pub binary: PathBuf,
    /// What kiln-agent installs besides the binary (unit, init script): part of the key.
    pub unit: String,
}

impl AgentFiles {
    /// The static agent binary ([`crate::agent_binary::locate`]: `$KILN_AGENT_BIN`, else the
    /// one embedded in kiln, written out to the cache).
    pub fn locate() -> Result<Self, BootstrapError> {
        Ok(Self {
            binary: crate::agent_binary::locate()?.path,
            unit: format!(
                "{}\n{}",
                kiln_agent::cloud_init::SYSTEMD_UNIT,
                kiln_agent::cloud_init::INIT_SCRIPT
            ),
        })
    }
}

fn check_name(s: &str) -> bool {
    // Debian package names: lowercase letters, digits, + - . ; at least two characters.
    s.len() >= 2
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// Validates the spec and computes the inputs (and so the cache key).
pub fn inputs(spec: &BootstrapSpec, agent: &AgentFiles) -> Result<BootstrapInputs, BootstrapError> {
    if spec.distro != "debian" {
        return Err(BootstrapError::Distro(spec.distro.clone()));
    }
    if !check_name(&spec.suite) {
        return Err(BootstrapError::Suite(spec.suite.clone()));
    }
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    // The kernel is one of the packages, so it is in the cache key (and the default's key is
    // the one it always was).
    let kernel = spec.kernel.as_deref().unwrap_or(DEFAULT_KERNEL);
    let named = kernel
        .strip_prefix("linux-image-")
        .is_some_and(|rest| !rest.is_empty());
    if !named || !check_name(kernel) {
        return Err(BootstrapError::Kernel(kernel.to_string()));
    }
    packages.push(kernel.to_string());
    for p in &spec.packages {
        // `pkg=version` pins are allowed; the name part must be a package name.
        let name = p.split_once('=').map(|x| x.0).unwrap_or(p);
        if !check_name(name) || p.contains(',') || p.contains(char::is_whitespace) {
            return Err(BootstrapError::PackageName(p.clone()));
        }
        packages.push(p.clone());
    }
    packages.sort();
    packages.dedup();
    if let Some(m) = &spec.mirror {
        if !(m.starts_with("http://") || m.starts_with("https://"))
            || m.contains(char::is_whitespace)
        {
            return Err(BootstrapError::Mirror(m.clone()));
        }
    }
    let agent_sha256 = sha256_file(&agent.binary)
        .map_err(PathIoError::at("reading the agent binary", &agent.binary))?;
    Ok(BootstrapInputs {
        recipe: RECIPE_VERSION,
        distro: spec.distro.clone(),
        suite: spec.suite.clone(),
        packages,
        mirror: spec.mirror.clone(),
        agent_sha256,
        agent_unit_sha256: sha256_bytes(agent.unit.as_bytes()),
    })
}

/// Returns the cached entry for these inputs, building it first if needed.
pub fn ensure(
    cache: &Cache,
    spec: &BootstrapSpec,
    agent: &AgentFiles,
    vm: Option<&str>,
    events: &dyn EventSink,
) -> Result<Bootstrapped, BootstrapError> {
    let inputs = inputs(spec, agent)?;
    let key = inputs.key();
    let dir = cache.bootstrap_dir(&key);
    // Builds of the same inputs in several processes wait for each other.
    let lock_path = cache.root().join("bootstrap").join(format!("{key}.lock"));
    let _lock = FileLock::acquire(&lock_path)?;
    if dir.is_dir() {
        let mut b = load_entry(&dir)?;
        b.cached = true;
        return Ok(b);
    }
    events.emit(&Event::Note {
        vm: vm.map(str::to_string),
        message: format!(
            "bootstrapping Debian {} with {} packages (cache key {})",
            inputs.suite,
            inputs.packages.len(),
            &key[..12]
        ),
    });
    build(cache, &inputs, agent, &key, vm, events)?;
    load_entry(&dir)
}

fn load_entry(dir: &Path) -> Result<Bootstrapped, BootstrapError> {
    let meta_path = dir.join("meta.json");
    let text = fs::read(&meta_path).map_err(PathIoError::at("reading", &meta_path))?;
    let meta: BootstrapMeta =
        serde_json::from_slice(&text).map_err(|e| BootstrapError::BadEntry {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
    let b = Bootstrapped {
        dir: dir.to_path_buf(),
        disk: dir.join("disk.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        meta,
        cached: false,
    };
    for p in [&b.disk, &b.kernel, &b.initrd] {
        if !p.is_file() {
            return Err(BootstrapError::BadEntry {
                path: dir.to_path_buf(),
                reason: format!(
                    "{} is missing; delete the folder to rebuild it",
                    p.display()
                ),
            });
        }
    }
    Ok(b)
}

fn build(
    cache: &Cache,
    inputs: &BootstrapInputs,
    agent: &AgentFiles,
    key: &str,
    vm: Option<&str>,
    events: &dyn EventSink,
) -> Result<(), BootstrapError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BootstrapError::NotRoot);
    }
    check_tools()?;
    let start = Instant::now();
    let work = cache.temp_dir("bootstrap-")?;
    let out = work.path().join("entry");
    fs::create_dir(&out).map_err(PathIoError::at("creating", &out))?;
    let root = work.path().join("root");
    let log = out.join("bootstrap.log");

    // 1. mmdebstrap.
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg("--mode=root")
        .arg(format!("--include={}", inputs.packages.join(",")))
        .arg(&inputs.suite)
        .arg(&root);
    if let Some(m) = &inputs.mirror {
        cmd.arg(m);
    }
    note(events, vm, "running mmdebstrap");
    run_logged(cmd, "mmdebstrap", "mmdebstrap", &log)?;

    // 2. Customize.
    let ids = layout::Ids::from_key(key);
    let root_uuid = ids.root_fs.to_string();
    customize(&root, agent, &root_uuid)?;
    grub::install_into_root(&root, &root_uuid, &log)?;
    check_kernel_links(&root)?;

    // 3. Record package versions, copy kernel and initrd.
    let package_versions = package_versions(&root, &log)?;
    let (kernel, initrd, kernel_version) = find_kernel(&root)?;
    fs::copy(&kernel, out.join("vmlinuz")).map_err(PathIoError::at("copying", &kernel))?;
    let out_initrd = out.join("initrd.img");
    let minimal_initrd = match initrd::make(&root, &kernel_version) {
        Ok((image, modules)) => {
            fs::write(&out_initrd, image).map_err(PathIoError::at("writing", &out_initrd))?;
            note(
                events,
                vm,
                &format!(
                    "direct-boot initramfs: kiln's minimal one ({} modules)",
                    modules.len()
                ),
            );
            true
        }
        Err(why) => {
            fs::copy(&initrd, &out_initrd).map_err(PathIoError::at("copying", &initrd))?;
            note(
                events,
                vm,
                &format!("direct-boot initramfs: the distro's ({why})"),
            );
            false
        }
    };

    // 4. The disk.
    let used = tree_size(&root).map_err(PathIoError::at("measuring", &root))?;
    let layout = layout::layout(disk_size(used), &ids);
    let raw = work.path().join("disk.raw");
    note(
        events,
        vm,
        &format!(
            "making a {} MiB disk (GPT, BIOS and UEFI GRUB) with an ext4 root from {} MiB of \
             files",
            layout.disk_size >> 20,
            used >> 20
        ),
    );
    write_disk(work.path(), &root, &raw, &layout, &ids, &log)?;
    // The root folder is no longer needed: free its space before converting.
    let _ = fs::remove_dir_all(&root);
    let disk = out.join("disk.qcow2");
    note(events, vm, "converting the disk to qcow2");
    convert_to_qcow2(&raw, &disk, &log)?;
    let _ = fs::remove_file(&raw);
    let disk_sha256 = sha256_file(&disk).map_err(PathIoError::at("reading", &disk))?;

    let meta = BootstrapMeta {
        key: key.to_string(),
        inputs: inputs.clone(),
        package_versions,
        kernel_version,
        root_device: format!("UUID={root_uuid}"),
        disk_sha256,
        disk_virtual_size: layout.disk_size,
        build_seconds: start.elapsed().as_secs_f64(),
        minimal_initrd,
    };
    let meta_path = out.join("meta.json");
    let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    fs::write(&meta_path, json).map_err(PathIoError::at("writing", &meta_path))?;

    // 5. Into place.
    let dst = cache.bootstrap_dir(key);
    fs::rename(&out, &dst).map_err(PathIoError::at("renaming into", &dst))?;
    note(
        events,
        vm,
        &format!("bootstrap done in {:.0} s", start.elapsed().as_secs_f64()),
    );
    Ok(())
}

fn note(events: &dyn EventSink, vm: Option<&str>, msg: &str) {
    events.emit(&Event::Note {
        vm: vm.map(str::to_string),
        message: msg.to_string(),
    });
}

/// Disk size for `used` bytes of files: room for the boot partitions (67 MiB), metadata and
/// the first package installs; the root grows to the manifest's disk size at first boot
/// anyway. At least 1 GiB and 64 MiB-aligned, so a 1 GiB disk in a manifest still fits.
pub fn disk_size(used: u64) -> u64 {
    let want = used + used / 3 + (384 << 20);
    let mib64 = 64 << 20;
    want.max(1 << 30).div_ceil(mib64) * mib64
}

/// Fails with the missing tool and its package when the host lacks one the recipe runs.
fn check_tools() -> Result<(), BootstrapError> {
    match missing_tools().into_iter().next() {
        Some((tool, package)) => Err(BootstrapError::MissingTool { tool, package }),
        None => Ok(()),
    }
}

/// The programs and GRUB folders making a base needs that this host lacks, each with its
/// Debian package (`kiln doctor` lists them all).
pub fn missing_tools() -> Vec<(String, String)> {
    let mut missing: Vec<(String, String)> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    missing.extend(grub::missing_tools());
    missing
}

/// Whether `prog` is on PATH or in the sbin folders a non-login root shell may lack.
fn on_path(prog: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(prog).is_file())
}

/// GRUB's menu boots `/vmlinuz` and `/initrd.img`, which Debian's kernel package keeps
/// pointing at the newest kernel.
fn check_kernel_links(root: &Path) -> Result<(), BootstrapError> {
    for link in ["vmlinuz", "initrd.img"] {
        // Relative, so GRUB (and the guest) resolve it inside the root, to a file.
        let p = root.join(link);
        let target = fs::read_link(&p).ok();
        let ok = target.is_some_and(|t| t.is_relative() && root.join(t).is_file());
        if !ok {
            return Err(BootstrapError::NoKernelLink(link));
        }
    }
    Ok(())
}

/// Writes the whole raw disk: the ext4 root made by `mkfs.ext4 -d` at its partition's
/// offset, the ESP, GRUB's core image in the BIOS boot partition, and the GPT (with boot.img
/// in the protective MBR's code area) at both ends.
fn write_disk(
    work: &Path,
    root: &Path,
    raw: &Path,
    layout: &layout::Layout,
    ids: &layout::Ids,
    log: &Path,
) -> Result<(), BootstrapError> {
    use std::os::unix::fs::FileExt;
    let (bios, esp_part, root_part) = (layout::BIOS_BOOT, layout::ESP, layout.root());
    let file = fs::File::create(raw).map_err(PathIoError::at("creating", raw))?;
    file.set_len(layout.disk_size)
        .map_err(PathIoError::at("sizing", raw))?;

    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-b", "4096", "-L", "kiln-root", "-U"])
        .arg(ids.root_fs.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},hash_seed={}",
            root_part.offset, ids.root_hash_seed
        ))
        .arg("-d")
        .arg(root)
        .arg(raw)
        .arg(format!("{}k", root_part.len >> 10));
    run_logged(mkfs, "mkfs.ext4 -d", "e2fsprogs", log)?;

    let esp_img = work.join("esp.img");
    let loader = grub::uefi_loader(work, &ids.root_fs.to_string(), log)?;
    esp::make(&esp_img, esp_part.len, ids.esp_volume_id, &loader, log)?;
    let esp = fs::read(&esp_img).map_err(PathIoError::at("reading", &esp_img))?;
    let _ = fs::remove_file(&esp_img);

    let mut core = grub::bios_core(work, &ids.root_fs.to_string(), log)?;
    let core_lba = bios.first_lba();
    grub::patch_core_blocklist(&mut core, core_lba, bios.len)?;
    let code = grub::patch_boot_sector(&grub::boot_img()?, core_lba)?;

    let gpt = layout.gpt();
    let mut head = gpt.primary;
    head[..grub::MBR_CODE_LEN].copy_from_slice(&code);
    let write = |data: &[u8], at: u64| {
        file.write_all_at(data, at)
            .map_err(PathIoError::at("writing", raw))
    };
    write(&esp, esp_part.offset)?;
    write(&core, bios.offset)?;
    write(&head, 0)?;
    write(&gpt.backup, gpt.backup_offset)?;
    file.sync_all().map_err(PathIoError::at("syncing", raw))?;
    Ok(())
}

fn customize(root: &Path, agent: &AgentFiles, root_uuid: &str) -> Result<(), BootstrapError> {
    let w = |rel: &str, data: &[u8]| -> Result<(), BootstrapError> {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(PathIoError::at("creating", parent))?;
        }
        fs::write(&p, data).map_err(PathIoError::at("writing", &p))?;
        Ok(())
    };
    let link = |target: &str, rel: &str| -> Result<(), BootstrapError> {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(PathIoError::at("creating", parent))?;
        }
        let _ = fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).map_err(PathIoError::at("linking", &p))?;
        Ok(())
    };

    // The agent, its unit (enabled for sysinit.target) and init.d fallback: kiln-agent's
    // own installer, so cloud images and bootstrapped roots get the same files.
    kiln_agent::cloud_init::install_into_root(root, &agent.binary, &[])
        .map_err(PathIoError::at("installing the agent into", root))?;
    w(
        kiln_agent::cloud_init::GUEST_UNIT.trim_start_matches('/'),
        early_agent_unit().as_bytes(),
    )?;

    // The root by UUID (disk names differ between hypervisors and buses); it grows to the
    // partition's size at boot, after systemd-repart grew the partition to the disk's end.
    w(
        "etc/fstab",
        format!(
            "# kiln: the root file system, grown at boot into what the disk gained\n\
             UUID={root_uuid} / ext4 defaults,x-systemd.growfs 0 1\n"
        )
        .as_bytes(),
    )?;
    w("etc/repart.d/50-kiln-root.conf", REPART_ROOT.as_bytes())?;
    // The hostname comes from `systemd.hostname=` on the kernel command line.
    let _ = fs::remove_file(root.join("etc/hostname"));
    w(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    )?;
    // Each VM (and each clone) generates its own at first boot.
    w("etc/machine-id", b"")?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));

    // DHCP on the build network, with systemd-networkd (part of systemd, so in minbase).
    w(
        "etc/systemd/network/80-kiln-dhcp.network",
        NETWORK_UNIT.as_bytes(),
    )?;
    link(
        "/lib/systemd/system/systemd-networkd.service",
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
    )?;
    link(
        "/lib/systemd/system/systemd-networkd.socket",
        "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
    )?;
    // Names through resolved, which takes the DNS server (the subnet's gateway) from networkd's
    // lease; VM names are single labels, which resolved sends to that server only when told.
    // Never the build host's resolv.conf that mmdebstrap copied in.
    w(
        "etc/systemd/resolved.conf.d/kiln.conf",
        b"[Resolve]\nResolveUnicastSingleLabel=yes\nLLMNR=no\nMulticastDNS=no\n",
    )?;
    let _ = fs::remove_file(root.join("etc/resolv.conf"));
    link("../run/systemd/resolve/stub-resolv.conf", "etc/resolv.conf")?;
    link(
        "/lib/systemd/system/systemd-resolved.service",
        "etc/systemd/system/multi-user.target.wants/systemd-resolved.service",
    )?;
    // Without dbus (minbase has none) networkd's stop can hang for its whole 90 s default at
    // every reboot and power-off; nothing needs it to stop cleanly.
    w(
        "etc/systemd/system/systemd-networkd.service.d/kiln.conf",
        b"[Service]\nTimeoutStopSec=5s\n",
    )?;
    // The vsock transport is a module; load it early so the agent can listen at once.
    w(
        "etc/modules-load.d/kiln.conf",
        b"vmw_vsock_virtio_transport\n",
    )?;
    // Generators run, one process each, before systemd starts any unit; these find nothing
    // to do in a VM whose partitions are in fstab, which never hibernates and has no offline
    // updates.
    for g in QUIET_GENERATORS {
        link("/dev/null", &format!("etc/systemd/system-generators/{g}"))?;
    }
    // Timers a build must not race: apt-daily takes the dpkg lock a step's `apt-get` needs
    // (its timer is persistent, so it fires at the first boot); the others only cost CPU.
    // Disabled, not masked: an image's user can enable them again.
    for unit in IDLE_UNITS {
        for wants in ["timers.target.wants", "multi-user.target.wants"] {
            let _ = fs::remove_file(root.join("etc/systemd/system").join(wants).join(unit));
        }
    }
    Ok(())
}

/// The shared agent unit waits for `systemd-remount-fs.service`: a cloud image's root may
/// be read-only until then. A bootstrapped root is mounted read-write by the kernel command
/// line (kiln's direct boot and its GRUB menu both pass `rw`), and under TCG that remount
/// finishes 2 to 4 s after systemd queues its jobs, behind a dozen sysinit units started at
/// once; so here the agent starts as soon as systemd starts units. (A drop-in cannot take an
/// `After=` away, hence the whole unit.)
pub fn early_agent_unit() -> String {
    kiln_agent::cloud_init::SYSTEMD_UNIT.replace(
        "After=systemd-remount-fs.service\n",
        "# kiln bootstrap base: the root is read-write from the kernel command line, so no\n\
         # wait for systemd-remount-fs.service.\n",
    )
}

/// systemd generators a bootstrapped root turns off (linked to /dev/null).
pub const QUIET_GENERATORS: &[&str] = &[
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-system-update-generator",
];

/// Units Debian enables that a bootstrapped root leaves disabled.
pub const IDLE_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
];

fn package_versions(root: &Path, log: &Path) -> Result<BTreeMap<String, String>, BootstrapError> {
    let admindir = root.join("var/lib/dpkg");
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${Package}\t${Version}\n"])
        .output()
        .map_err(|e| tool_missing_or(e, "dpkg-query", "dpkg"))?;
    if !out.status.success() {
        return Err(BootstrapError::Tool {
            what: "dpkg-query".into(),
            status: out.status.to_string(),
            tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            log: log.to_path_buf(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect())
}

/// The newest kernel in the root's /boot and its initrd.
fn find_kernel(root: &Path) -> Result<(PathBuf, PathBuf, String), BootstrapError> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .map_err(PathIoError::at("reading", &boot))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .filter(|v| boot.join(format!("initrd.img-{v}")).is_file())
        .collect();
    versions.sort_by(|a, b| crate::bootimage::compare_versions(a, b));
    let v = versions.pop().ok_or(BootstrapError::NoKernel)?;
    Ok((
        boot.join(format!("vmlinuz-{v}")),
        boot.join(format!("initrd.img-{v}")),
        v,
    ))
}

/// Bytes of regular files under `dir`, not following symlinks.
fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                // Block-rounded, like the file system will store it.
                total += md.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(total)
}

fn tool_missing_or(e: io::Error, tool: &str, package: &str) -> BootstrapError {
    if e.kind() == io::ErrorKind::NotFound {
        BootstrapError::MissingTool {
            tool: tool.into(),
            package: package.into(),
        }
    } else {
        crate::path_io::PathIoError {
            what: "running",
            path: PathBuf::from(tool),
            source: e,
        }
        .into()
    }
}

/// Runs a tool with its output appended to `log`; on failure the error carries the last
/// lines.
fn run_logged(
    mut cmd: Command,
    what: &str,
    package: &str,
    log: &Path,
) -> Result<(), BootstrapError> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(PathIoError::at("opening", log))?;
    let _ = writeln!(f, "$ {cmd:?}");
    let f2 = f.try_clone().map_err(PathIoError::at("opening", log))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .status()
        .map_err(|e| tool_missing_or(e, &program, package))?;
    if status.success() {
        return Ok(());
    }
    Err(BootstrapError::Tool {
        what: what.into(),
        status: status.to_string(),
        tail: tail_lines(log, 15),
        log: log.to_path_buf(),
    })
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// raw -> qcow2. Uses kiln-disk's converter.
fn convert_to_qcow2(raw: &Path, qcow2: &Path, log: &Path) -> Result<(), BootstrapError> {
    let _ = log;
    crate::diskops::convert_raw_to_qcow2(raw, qcow2)
        .map_err(|e| BootstrapError::Convert(e.to_string()))
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, BootstrapError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(PathIoError::at("opening", path))?;
        file.lock().map_err(PathIoError::at("locking", path))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> (tempfile::TempDir, AgentFiles) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln-agent");
        fs::write(&p, b"\x7fELF fake agent").unwrap();
        (
            d,
            AgentFiles {
                binary: p,
                unit: "unit".into(),
            },
        )
    }

    fn spec(pkgs: &[&str]) -> BootstrapSpec {
        BootstrapSpec {
            distro: "debian".into(),
            suite: "bookworm".into(),
            packages: pkgs.iter().map(|s| s.to_string()).collect(),
            mirror: None,
            kernel: None,
        }
    }

    #[test]
    fn the_kernel_package_replaces_the_cloud_kernel_and_changes_the_key() {
        let (_d, a) = agent();
        let cloud = inputs(&spec(&["ethtool"]), &a).unwrap();
        assert!(cloud.packages.iter().any(|p| p == DEFAULT_KERNEL));
        let mut s = spec(&["ethtool"]);
        s.kernel = Some("linux-image-amd64".into());
        let generic = inputs(&s, &a).unwrap();
        assert!(generic.packages.iter().any(|p| p == "linux-image-amd64"));
        assert!(!generic.packages.iter().any(|p| p == DEFAULT_KERNEL));
        assert_ne!(cloud.key(), generic.key());
        // Naming the default is the default.
        s.kernel = Some(DEFAULT_KERNEL.into());
        assert_eq!(inputs(&s, &a).unwrap().key(), cloud.key());
        for bad in [
            "nginx",
            "linux-image-",
            "linux-image-amd64,curl",
            "Linux-image-amd64",
        ] {
            s.kernel = Some(bad.into());
            assert!(
                matches!(inputs(&s, &a), Err(BootstrapError::Kernel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_ignores_package_order_and_duplicates() {
        let (_d, a) = agent();
        let k1 = inputs(&spec(&["nginx", "curl"]), &a).unwrap().key();
        let k2 = inputs(&spec(&["curl", "nginx", "curl", "udev"]), &a)
            .unwrap()
            .key();
        assert_eq!(k1, k2);
        let k3 = inputs(&spec(&["curl"]), &a).unwrap().key();
        assert_ne!(k1, k3);
    }

    #[test]
    fn key_covers_agent_and_mirror() {
        let (_d, a) = agent();
        let k1 = inputs(&spec(&[]), &a).unwrap().key();
        let mut s = spec(&[]);
        s.mirror = Some("http://mirror.example/debian".into());
        assert_ne!(k1, inputs(&s, &a).unwrap().key());
        fs::write(&a.binary, b"another agent").unwrap();
        assert_ne!(k1, inputs(&spec(&[]), &a).unwrap().key());
    }

    #[test]
    fn rejects_bad_inputs() {
        let (_d, a) = agent();
        assert!(matches!(
            inputs(&spec(&["ok", "bad name"]), &a),
            Err(BootstrapError::PackageName(_))
        ));
        assert!(matches!(
            inputs(&spec(&["--option"]), &a),
            Err(BootstrapError::PackageName(_))
        ));
        assert!(matches!(
            inputs(&spec(&["a,b"]), &a),
            Err(BootstrapError::PackageName(_))
        ));
        let mut s = spec(&[]);
        s.distro = "fedora".into();
        assert!(matches!(inputs(&s, &a), Err(BootstrapError::Distro(_))));
        let mut s = spec(&[]);
        s.suite = "../x".into();
        assert!(matches!(inputs(&s, &a), Err(BootstrapError::Suite(_))));
        let mut s = spec(&[]);
        s.mirror = Some("file:///etc".into());
        assert!(matches!(inputs(&s, &a), Err(BootstrapError::Mirror(_))));
        assert!(inputs(&spec(&["nginx=1.22.1-9", "g++"]), &a).is_ok());
    }

    #[test]
    fn disk_size_has_headroom() {
        assert_eq!(disk_size(0), 1 << 30);
        let s = disk_size(400 << 20);
        assert!(s >= (400u64 << 20) * 4 / 3 + (384 << 20));
        assert_eq!(s % (64 << 20), 0);
    }

    #[test]
    fn kernel_links_must_lead_to_files_in_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir(r.join("boot")).unwrap();
        fs::write(r.join("boot/vmlinuz-6.1.0-1"), b"k").unwrap();
        fs::write(r.join("boot/initrd.img-6.1.0-1"), b"i").unwrap();
        assert!(matches!(
            check_kernel_links(r),
            Err(BootstrapError::NoKernelLink("vmlinuz"))
        ));
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-1", r.join("vmlinuz")).unwrap();
        // Absolute: would point at the build host's file, not the guest's.
        std::os::unix::fs::symlink("/boot/initrd.img-6.1.0-1", r.join("initrd.img")).unwrap();
        assert!(matches!(
            check_kernel_links(r),
            Err(BootstrapError::NoKernelLink("initrd.img"))
        ));
        fs::remove_file(r.join("initrd.img")).unwrap();
        std::os::unix::fs::symlink("boot/initrd.img-6.1.0-1", r.join("initrd.img")).unwrap();
        check_kernel_links(r).unwrap();
    }

    /// The whole disk from a tiny root, read back like kiln's direct boot reads a source: the
    /// GPT, the kernel in the ext4 root partition and `root=UUID=` with the key's UUID.
    #[test]
    fn written_disk_has_the_table_loaders_and_a_bootable_root() {
        if let Err(e) = check_tools() {
            eprintln!("SKIP: written_disk_has_the_table_loaders_and_a_bootable_root: {e}");
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::write(root.join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"kernel").unwrap();
        fs::write(root.join("boot/initrd.img-6.1.0-1-cloud-amd64"), b"initrd").unwrap();
        let ids = layout::Ids::from_key("test-key");
        let l = layout::layout(layout::MIN_DISK + (64 << 20), &ids);
        let raw = work.path().join("disk.raw");
        let log = work.path().join("log");
        write_disk(work.path(), &root, &raw, &l, &ids, &log)
            .unwrap_or_else(|e| panic!("{e}\n{}", fs::read_to_string(&log).unwrap_or_default()));

        let f = fs::File::open(&raw).unwrap();
        assert_eq!(f.metadata().unwrap().len(), l.disk_size);
        let boot = crate::bootimage::find_boot(std::sync::Arc::new(crate::bootimage::RawImage(f)))
            .unwrap();
        assert_eq!(boot.kernel, b"kernel");
        assert_eq!(boot.initrd.as_deref(), Some(&b"initrd"[..]));
        assert_eq!(boot.partition, Some(3));
        assert_eq!(boot.root, format!("UUID={}", ids.root_fs));

        let bytes = fs::read(&raw).unwrap();
        let at = |off: u64, n: usize| &bytes[off as usize..off as usize + n];
        // boot.img in the MBR, pointing at the BIOS boot partition; the table kept.
        assert_eq!(
            at(0x5c, 8),
            &layout::BIOS_BOOT.first_lba().to_le_bytes(),
            "boot.img's core sector"
        );
        assert_eq!(at(446 + 4, 1), &[0xEE]);
        assert_eq!(at(510, 2), &[0x55, 0xAA]);
        assert_eq!(at(512, 8), b"EFI PART");
        // The core image there, its block list patched to its second sector.
        let core = layout::BIOS_BOOT.offset;
        assert_eq!(
            at(core + 500, 8),
            &(layout::BIOS_BOOT.first_lba() + 1).to_le_bytes()
        );
        // A FAT32 ESP with the key's volume id.
        let esp = layout::ESP.offset;
        assert_eq!(at(esp + 82, 8), b"FAT32   ");
        assert_eq!(at(esp + 67, 4), &ids.esp_volume_id.to_le_bytes());
        // The backup GPT header in the last sector.
        assert_eq!(at(l.disk_size - 512, 8), b"EFI PART");
        // ... holding the UEFI loader where firmware looks without NVRAM entries.
        let esp_img = work.path().join("esp-back.img");
        fs::write(&esp_img, at(esp, layout::ESP.len as usize)).unwrap();
        let dir = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-b")
            .arg("-i")
            .arg(&esp_img)
            .arg("::/EFI/BOOT")
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&dir.stdout);
        assert!(listing.contains("BOOTX64.EFI"), "{listing}");
    }

    #[test]
    fn customize_installs_agent_and_config() {
        let (_d, a) = agent();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/hostname"), "builder\n").unwrap();
        fs::write(root.path().join("etc/machine-id"), "abc\n").unwrap();
        customize(root.path(), &a, "0b5f0c1e-7c38-4c3c-9d9e-1f2a3b4c5d6e").unwrap();
        let r = root.path();
        assert!(r.join("usr/local/bin/kiln-agent").is_file());
        assert!(!r.join("etc/hostname").exists());
        assert_eq!(fs::read(r.join("etc/machine-id")).unwrap(), b"");
        let fstab = fs::read_to_string(r.join("etc/fstab")).unwrap();
        assert!(
            fstab.contains(
                "UUID=0b5f0c1e-7c38-4c3c-9d9e-1f2a3b4c5d6e / ext4 defaults,x-systemd.growfs"
            ),
            "{fstab}"
        );
        let repart = fs::read_to_string(r.join("etc/repart.d/50-kiln-root.conf")).unwrap();
        assert!(repart.contains("Type=root-x86-64"), "{repart}");
        let l = fs::read_link(r.join("etc/systemd/system/sysinit.target.wants/kiln-agent.service"))
            .unwrap();
        assert_eq!(l, Path::new("/etc/systemd/system/kiln-agent.service"));
        // Started without waiting for the root's remount; the rest of the shared unit kept.
        let unit = fs::read_to_string(r.join("etc/systemd/system/kiln-agent.service")).unwrap();
        assert!(kiln_agent::cloud_init::SYSTEMD_UNIT.contains("After=systemd-remount-fs.service\n"));
        assert!(!unit.contains("After="), "{unit}");
        assert!(unit.contains("DefaultDependencies=no\n"), "{unit}");
        assert!(
            unit.contains("ExecStart=/usr/local/bin/kiln-agent "),
            "{unit}"
        );
        let l = fs::read_link(r.join("etc/resolv.conf")).unwrap();
        assert_eq!(l, Path::new("../run/systemd/resolve/stub-resolv.conf"));
    }

    #[test]
    fn customize_turns_off_generators_and_idle_units() {
        let (_d, a) = agent();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let timers = r.join("etc/systemd/system/timers.target.wants");
        fs::create_dir_all(&timers).unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/apt-daily.timer",
            timers.join("apt-daily.timer"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/other.timer",
            timers.join("other.timer"),
        )
        .unwrap();
        customize(r, &a, "0b5f0c1e-7c38-4c3c-9d9e-1f2a3b4c5d6e").unwrap();
        for g in QUIET_GENERATORS {
            let l = fs::read_link(r.join("etc/systemd/system-generators").join(g)).unwrap();
            assert_eq!(l, Path::new("/dev/null"), "{g}");
        }
        assert!(!timers.join("apt-daily.timer").exists());
        assert!(fs::symlink_metadata(timers.join("other.timer")).is_ok());
    }
}
