//! `bootstrap` sources: a Debian root built from packages with mmdebstrap, with the distro
//! kernel and kiln's agent installed, made into an ext4 disk and cached by its inputs.
//!
//! The recipe (bump [`RECIPE_VERSION`] whenever it changes what lands in the image):
//! 1. `mmdebstrap --variant=minbase --include=systemd-sysv,udev,linux-image-cloud-amd64,<pkgs>
//!    <suite> <dir> [mirror]` as root (no unshare needed); the source's `kernel` replaces the
//!    cloud kernel package.
//! 2. Customize the root: the agent binary and its systemd unit (enabled), `/etc/fstab` with the
//!    root on `/dev/vda` (the whole disk is the file system: no partition table, so the kernel
//!    command line is simply `root=/dev/vda` and the file system can grow in place with
//!    `x-systemd.growfs` when the overlay is larger), no `/etc/hostname` (the VM's name comes from
//!    `systemd.hostname=` on the command line), an empty machine-id, DHCP on every NIC with
//!    systemd-networkd, names through systemd-resolved (VM names are single labels).
//! 3. Record the package versions (`dpkg-query --admindir`), copy the kernel and initrd out of
//!    `/boot` (the Debian initramfs-tools initrd with `MODULES=most` carries virtio_pci and
//!    virtio_blk).
//! 4. `mkfs.ext4 -d <dir> disk.raw <size>`, then convert to qcow2.
//! 5. Rename the finished folder into `bootstrap/<key>`; the key is the SHA-256 of the inputs.

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
pub const RECIPE_VERSION: u32 = 4;

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
    #[error(
        "the kiln agent binary was not found (looked in: {looked}); run scripts/setup.sh or set \
         KILN_AGENT_BIN"
    )]
    NoAgent { looked: String },
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
}

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
    /// The static agent binary, found by kiln-agent (`$KILN_AGENT_BIN`, beside `kiln`, or
    /// `target/agent/kiln-agent`).
    pub fn locate() -> Result<Self, BootstrapError> {
        match kiln_agent::locate_binary() {
            Some(binary) => Ok(Self {
                binary,
                unit: format!(
                    "{}\n{}",
                    kiln_agent::cloud_init::SYSTEMD_UNIT,
                    kiln_agent::cloud_init::INIT_SCRIPT
                ),
            }),
            None => Err(BootstrapError::NoAgent {
                looked: "$KILN_AGENT_BIN, kiln-agent beside the kiln binary, ../agent/kiln-agent \
                         (static builds only)"
                    .into(),
            }),
        }
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
    customize(&root, agent)?;

    // 3. Record package versions, copy kernel and initrd.
    let package_versions = package_versions(&root, &log)?;
    let (kernel, initrd, kernel_version) = find_kernel(&root)?;
    fs::copy(&kernel, out.join("vmlinuz")).map_err(PathIoError::at("copying", &kernel))?;
    fs::copy(&initrd, out.join("initrd.img")).map_err(PathIoError::at("copying", &initrd))?;

    // 4. The disk.
    let used = tree_size(&root).map_err(PathIoError::at("measuring", &root))?;
    let size = fs_size(used);
    let raw = work.path().join("disk.raw");
    note(
        events,
        vm,
        &format!(
            "making a {} MiB ext4 file system from {} MiB of files",
            size >> 20,
            used >> 20
        ),
    );
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", "kiln-root", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg(format!("{}k", size >> 10));
    run_logged(mkfs, "mkfs.ext4 -d", "e2fsprogs", &log)?;
    // The root folder is no longer needed: free its space before converting.
    let _ = fs::remove_dir_all(&root);
    let disk = out.join("disk.qcow2");
    note(events, vm, "converting the root file system to qcow2");
    convert_to_qcow2(&raw, &disk, &log)?;
    let _ = fs::remove_file(&raw);
    let disk_sha256 = sha256_file(&disk).map_err(PathIoError::at("reading", &disk))?;

    let meta = BootstrapMeta {
        key: key.to_string(),
        inputs: inputs.clone(),
        package_versions,
        kernel_version,
        root_device: "/dev/vda".into(),
        disk_sha256,
        disk_virtual_size: size,
        build_seconds: start.elapsed().as_secs_f64(),
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

/// File-system size for `used` bytes of files: room for metadata and for the first package
/// installs; the disk grows to the manifest's size at first boot anyway.
pub fn fs_size(used: u64) -> u64 {
    let want = used + used / 3 + (384 << 20);
    let mib64 = 64 << 20;
    want.max(1 << 30).div_ceil(mib64) * mib64
}

fn customize(root: &Path, agent: &AgentFiles) -> Result<(), BootstrapError> {
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

    // The root is the whole of /dev/vda; it grows to the overlay's size at boot.
    w(
        "etc/fstab",
        b"# kiln: the root file system is the whole first virtio disk (no partition table)\n\
          /dev/vda / ext4 defaults,x-systemd.growfs 0 1\n",
    )?;
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
    Ok(())
}

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
    fn fs_size_has_headroom() {
        assert_eq!(fs_size(0), 1 << 30);
        let s = fs_size(400 << 20);
        assert!(s >= (400u64 << 20) * 4 / 3 + (384 << 20));
        assert_eq!(s % (64 << 20), 0);
    }

    #[test]
    fn customize_installs_agent_and_config() {
        let (_d, a) = agent();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/hostname"), "builder\n").unwrap();
        fs::write(root.path().join("etc/machine-id"), "abc\n").unwrap();
        customize(root.path(), &a).unwrap();
        let r = root.path();
        assert!(r.join("usr/local/bin/kiln-agent").is_file());
        assert!(!r.join("etc/hostname").exists());
        assert_eq!(fs::read(r.join("etc/machine-id")).unwrap(), b"");
        let fstab = fs::read_to_string(r.join("etc/fstab")).unwrap();
        assert!(fstab.contains("/dev/vda / ext4"));
        let l = fs::read_link(r.join("etc/systemd/system/sysinit.target.wants/kiln-agent.service"))
            .unwrap();
        assert_eq!(l, Path::new("/etc/systemd/system/kiln-agent.service"));
        let l = fs::read_link(r.join("etc/resolv.conf")).unwrap();
        assert_eq!(l, Path::new("../run/systemd/resolve/stub-resolv.conf"));
    }
}
