//! The typed, validated build plan: what the rest of kiln consumes. Every value here has been
//! checked, defaults are applied and references are resolved, so consumers never re-validate.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Serialize, Serializer};

use super::boot::BootEvent;

/// The effective plan of a module manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The module name: `metadata.name` of the envelope, else the manifest's file stem.
    pub module: String,
    /// The directory relative paths in the manifest were resolved against (absolute when the
    /// manifest was loaded from a file).
    pub manifest_dir: PathBuf,
    /// What the build runs: `buildOverrides` applied.
    pub build: View,
    /// What clones of the module inherit: the base values, without `buildOverrides`.
    pub base: View,
    /// Named files (`files[]`), in manifest order.
    pub files: Vec<FileEntry>,
    /// Names of `files` served over HTTP during boot (`httpDirectory.files`).
    pub http_directory: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(serialize_with = "ser_duration")]
    pub iso_cache_ttl: Duration,
}

impl Plan {
    /// The VMs as the build runs them (overrides applied).
    pub fn vms(&self) -> &[Vm] {
        &self.build.vms
    }

    /// A named file of `files[]`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// One complete view of the module: its VMs and its network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    pub vms: Vec<Vm>,
    pub network: Network,
}

impl View {
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub name: String,
    pub source: Source,
    /// Guest vCPUs: the `cpu` quantity rounded up, at least 1.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The first disk is the boot disk and receives the source; the rest are blank.
    pub disks: Vec<Disk>,
    pub communicator: Communicator,
    /// `Some` when the manifest has a `cloudInit` key: a NoCloud seed is attached.
    pub cloud_init: Option<CloudInit>,
    pub nics: Vec<Nic>,
    pub provisioners: Vec<Provisioner>,
    /// `bootCommand` parsed into key events and waits, in typing order.
    pub boot_command: Vec<BootEvent>,
    /// kiln extension `bootWait`: from the VM's start to the boot command's first key.
    #[serde(serialize_with = "ser_duration")]
    pub boot_wait: Duration,
    /// kiln extension `bootKeyInterval`: the pause after each key of the boot command.
    #[serde(serialize_with = "ser_duration")]
    pub boot_key_interval: Duration,
    pub isos: Vec<Iso>,
    /// Names of `files` written to a 1.44 MB FAT floppy (build only).
    pub floppy_files: Vec<String>,
    /// `Some` for UEFI boot; `None` for BIOS.
    pub efi: Option<Efi>,
    /// kiln extension `boot`: direct kernel boot or firmware, chosen per VM or forced.
    pub boot: Boot,
    pub invisible: bool,
}

impl Vm {
    /// Whether the build reaches this VM through its own sshd ([`Source::over_ssh`]).
    pub fn over_ssh(&self) -> bool {
        self.source
            .over_ssh(self.communicator.kind, self.cloud_init.is_some())
    }
}

/// kiln extension `boot`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// Direct where kiln can read the image's kernel and nothing asks for firmware.
    #[default]
    Auto,
    Direct,
    Firmware,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum Source {
    /// A disk image (qcow2 or raw) to download; `sha256` is lowercase hex when given.
    Url { url: String, sha256: Option<String> },
    /// A local disk image; the path is resolved relative to the manifest.
    File { path: PathBuf },
    /// A root file system built from distro packages with mmdebstrap.
    Bootstrap {
        distro: String,
        suite: String,
        packages: Vec<String>,
        mirror: Option<String>,
        /// The kernel package instead of the cloud kernel (kiln extension).
        kernel: Option<String>,
    },
    /// The captured disk of a previous module; existence is checked when the build starts.
    BuildRef {
        name: String,
        namespace: Option<String>,
        vm_name: Option<String>,
    },
    /// An empty boot disk.
    Blank,
}

/// How kiln puts its agent into a VM: where it can, the build talks to the agent, whatever
/// `communicator` says, so the SSH fields would change nothing there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentWay {
    /// Installed in the bootstrapped root file system.
    Bootstrap,
    /// Carried by the parent module's captured disk.
    BuildRef,
    /// Installed by the NoCloud seed (`cloudInit`) of a `url` or `file` image.
    CloudInit,
}

impl Source {
    /// The one rule for "can kiln put its agent in": validation refuses SSH fields by it and
    /// the build picks the communicator by it (through [`Source::over_ssh`]).
    pub fn agent_way(&self, has_cloud_init: bool) -> Option<AgentWay> {
        match self {
            Source::Bootstrap { .. } => Some(AgentWay::Bootstrap),
            Source::BuildRef { .. } => Some(AgentWay::BuildRef),
            Source::Url { .. } | Source::File { .. } if has_cloud_init => Some(AgentWay::CloudInit),
            Source::Url { .. } | Source::File { .. } | Source::Blank => None,
        }
    }

    /// Whether the build reaches a VM of this source through its own sshd: `type: ssh` where
    /// kiln cannot put its agent in.
    pub fn over_ssh(&self, kind: CommunicatorKind, has_cloud_init: bool) -> bool {
        kind == CommunicatorKind::Ssh && self.agent_way(has_cloud_init).is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Virtio,
    Scsi,
    Sata,
    Usb,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    pub bus: DiskBus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommunicatorKind {
    Agent,
    Ssh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shell {
    Bash,
    Sh,
    Powershell,
    Cmd,
}

impl Shell {
    /// A Windows shell: paths may start with a drive letter, the reboot is `shutdown /r`.
    pub fn is_windows(self) -> bool {
        matches!(self, Shell::Powershell | Shell::Cmd)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Communicator {
    pub kind: CommunicatorKind,
    pub shell: Shell,
    pub ssh_username: String,
    pub ssh_port: u16,
    pub ssh_password: Option<Secret>,
    #[serde(serialize_with = "ser_duration")]
    pub ssh_timeout: Duration,
    /// `sshPrivateKeySecret`: a key file path (`name`, and `key` inside it when given).
    pub ssh_private_key: Option<PathBuf>,
}

/// A secret value: never printed by `Debug` or serialized; call [`Secret::expose`] to use it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    pub user_data: Option<String>,
    /// `userDataFrom` resolved to a local file.
    pub user_data_from: Option<PathBuf>,
    pub network_data: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    Virtio,
    E1000,
    E1000e,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    pub name: String,
    pub subnet: String,
    /// The VPC of the subnet.
    pub vpc: String,
    /// 1-9, unique per VM: the guest's interface order.
    pub slot: u8,
    /// A static address; `None` means DHCP (or unconfigured on an unmanaged subnet).
    pub ip: Option<Ipv4Addr>,
    /// Lowercase `xx:xx:xx:xx:xx:xx`; derived from module, VM and NIC names when not given,
    /// so rebuilds and clones keep it.
    pub mac: String,
    /// The device the guest sees; e1000 and e1000e need the qemu engine.
    pub model: NicModel,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Provisioner {
    pub name: String,
    #[serde(serialize_with = "ser_duration")]
    pub step_timeout: Duration,
    /// `cache: false`: never taken from the step cache (nor any step after it).
    #[serde(skip_serializing_if = "is_true")]
    pub cache: bool,
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "type"
)]
pub enum Step {
    Shell {
        /// The script: `inline`, or the contents of `scriptFrom` when that is used.
        script: ScriptSource,
        env: BTreeMap<String, String>,
        /// Wraps the script; `{{ .Command }}` is its placeholder.
        execute_command: Option<String>,
    },
    File {
        content: FileContent,
        /// An absolute guest path.
        destination: String,
    },
    Reboot {
        /// The command that reboots the guest (the shell's default when not given).
        command: String,
    },
    Handbuild {
        instructions: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ScriptSource {
    Inline(String),
    /// `scriptFrom` resolved to a local file.
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FileContent {
    Inline(String),
    Url(String),
    /// A local file (a `file.source` ConfigMap/Secret reference read as a path).
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub name: String,
    pub content: FileContent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Iso {
    pub url: String,
    /// Lowercase hex SHA-256 when given.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Efi {
    pub secure_boot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub vpcs: Vec<Vpc>,
    pub subnets: Vec<Subnet>,
}

impl Network {
    pub fn subnet(&self, name: &str) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.name == name)
    }
    pub fn vpc(&self, name: &str) -> Option<&Vpc> {
        self.vpcs.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Vpc {
    pub name: String,
    pub internet: bool,
    /// kiln extension `hostAccess`: the NAT carries flows to the host's own addresses.
    pub host_access: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subnet {
    pub name: String,
    pub vpc: String,
    pub cidr: Ipv4Net,
    pub dhcp: bool,
    /// Upstream DNS servers handed out by DHCP; empty means kiln's resolver alone.
    pub dns: Vec<Ipv4Addr>,
    pub unmanaged: bool,
    /// Managed: the first usable address. Unmanaged: the second-to-last usable address.
    pub gateway: Ipv4Addr,
}

fn is_true(b: &bool) -> bool {
    *b
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&super::units::format_duration(*d))
}
