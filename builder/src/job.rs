//! The build job: what the builder needs from a manifest, resolved and typed.
//!
//! The manifest module parses and validates YAML into its `Plan`; this module is the narrow
//! interface the rest of the builder works against (sources, engines, provisioning, capture),
//! so those parts can be tested without YAML and do not change when the schema grows.
//! [`crate::plan_adapter`] turns a `Plan` into a [`BuildJob`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::mac::Mac;

/// A whole build.
#[derive(Debug, Clone)]
pub struct BuildJob {
    /// The module's name (directory under the output folder).
    pub name: String,
    /// The manifest file, for the module's record and relative paths.
    pub manifest_path: PathBuf,
    /// The manifest's text as built.
    pub manifest_text: String,
    pub vms: Vec<VmJob>,
    /// `files[]`, by name.
    pub files: BTreeMap<String, FileContent>,
    /// `httpDirectory`: names of `files` served over HTTP at the gateways during the build.
    pub http_directory: Vec<String>,
    /// Bounds the whole build.
    pub timeout: Duration,
    /// Automatic retries of a failed build.
    pub retries: u32,
    /// How long a downloaded ISO is trusted before its checksum is checked again (`isoCacheTTL`).
    pub iso_cache_ttl: Duration,
    /// The build's network: `buildOverrides` applied (build-only internet, override NICs).
    pub network: NetJob,
    /// What clones inherit: the base network, NICs and resources, without `buildOverrides`.
    pub base: BaseView,
}

/// The module network: VPCs and subnets. Serialized into the module (`base.yaml`) so clones
/// get the same network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetJob {
    pub vpcs: Vec<VpcJob>,
    pub subnets: Vec<SubnetJob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VpcJob {
    pub name: String,
    /// Guest flows to outside addresses go out through the host's sockets (NAT).
    pub internet: bool,
    /// Guest flows to the host's own addresses are carried too (`hostAccess`).
    #[serde(default)]
    pub host_access: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetJob {
    pub name: String,
    pub vpc: String,
    /// Written `a.b.c.d/n` in `base.yaml`.
    pub cidr: Ipv4Net,
    pub dhcp: bool,
    pub unmanaged: bool,
    /// Upstream resolvers for names that are not VM names (VPCs with internet only).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// One NIC of a VM, in slot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicJob {
    pub name: String,
    pub subnet: String,
    /// Written `xx:xx:xx:xx:xx:xx` in `base.yaml`; checked again when it is read back.
    pub mac: Mac,
    /// A fixed address (a fixed DHCP lease on managed subnets).
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The device the guest sees; absent in a `base.yaml` of an earlier kiln (virtio).
    #[serde(default, skip_serializing_if = "NicModel::is_virtio")]
    pub model: NicModel,
}

/// The NIC device the guest sees (`nics[].model`). Whatever the model, the NIC is a port on
/// kiln-net's switch: same MAC, DHCP lease and DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// virtio-net: kiln-vmm's device (over vhost-user under the qemu engine).
    #[default]
    Virtio,
    /// QEMU's Intel 82540EM (qemu engine), over a `-netdev stream` socket kiln-net serves.
    E1000,
    /// QEMU's Intel 82574L (qemu engine), the same way.
    E1000e,
}

impl NicModel {
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
        }
    }

    /// For `skip_serializing_if`: `base.yaml` names only the models that are not the default.
    pub fn is_virtio(&self) -> bool {
        *self == NicModel::Virtio
    }
}

/// What a clone of the module runs: the base values of the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseView {
    pub network: NetJob,
    pub vms: Vec<BaseVm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseVm {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub nics: Vec<NicJob>,
}

impl BaseView {
    pub fn vm(&self, name: &str) -> Option<&BaseVm> {
        self.vms.iter().find(|v| v.name == name)
    }
}

/// One VM of the module.
#[derive(Debug, Clone)]
pub struct VmJob {
    pub name: String,
    pub source: SourceSpec,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The first disk receives the source; the others are blank.
    pub disks: Vec<DiskJob>,
    /// A NoCloud seed is attached when present (user-data to merge with kiln's).
    pub cloud_init: Option<CloudInit>,
    pub steps: Vec<Step>,
    /// Whether the template cleanup before capture runs (machine-id, host keys, logs...).
    pub clean_for_template: bool,
    /// Whether the build network gives this VM internet access.
    pub internet: bool,
    /// The VM's NICs on the build network, in slot order.
    pub nics: Vec<NicJob>,
    /// How long the first boot may take until the agent answers (`sshTimeout`).
    pub boot_timeout: Duration,
    /// The firmware the VM boots through when it does not boot its kernel directly
    /// (`efiFirmware`; BIOS when absent).
    pub firmware: Firmware,
    /// Direct kernel boot or firmware: chosen per VM (`auto`) or forced.
    pub boot: BootChoice,
    /// `isos`: CD-ROMs attached for the build only, in order; a `blank` disk boots from the
    /// first one, and from its disk once the installer wrote a boot loader.
    pub isos: Vec<IsoJob>,
    /// `floppy.files`: names of `files` written to a 1.44 MB FAT12 floppy (drive A), build only.
    pub floppy_files: Vec<String>,
    /// `bootCommand`: keys typed into the VM's keyboard after `boot_wait`.
    pub boot_command: Vec<crate::manifest::boot::BootEvent>,
    /// How long after the VM starts the boot command's first key is typed (`bootWait`).
    pub boot_wait: Duration,
    /// The pause after each key of the boot command (`bootKeyInterval`).
    pub boot_key_interval: Duration,
    /// How the build reaches the guest to run its steps.
    pub communicator: CommunicatorJob,
    /// Kept out of every console view (`invisible`).
    pub invisible: bool,
}

#[cfg(test)]
impl VmJob {
    /// A VM of 1 vCPU and 512 MiB with nothing else: what unit tests change a field or two of.
    pub fn for_test(name: &str, source: SourceSpec) -> VmJob {
        VmJob {
            name: name.into(),
            source,
            cpus: 1,
            memory_mib: 512,
            disks: vec![],
            cloud_init: None,
            steps: vec![],
            clean_for_template: false,
            internet: false,
            nics: vec![],
            boot_timeout: Duration::from_secs(60),
            firmware: Firmware::default(),
            boot: BootChoice::default(),
            isos: vec![],
            floppy_files: vec![],
            boot_command: vec![],
            boot_wait: Duration::ZERO,
            boot_key_interval: Duration::ZERO,
            communicator: CommunicatorJob::Agent,
            invisible: false,
        }
    }
}

/// An `isos` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsoJob {
    pub url: String,
    /// Lowercase hex; when given, checked before anything boots.
    pub sha256: Option<String>,
}

/// How the build reaches a guest (`communicator`).
#[derive(Debug, Clone, Default)]
pub enum CommunicatorJob {
    /// kiln's agent over vsock (installed through cloud-init or written into a bootstrap root).
    #[default]
    Agent,
    /// The guest's own sshd, through the module network (ISO installs, images without the agent).
    Ssh(SshJob),
}

/// The `ssh*` fields of a VM's communicator.
#[derive(Debug, Clone)]
pub struct SshJob {
    /// Steps run as this user.
    pub username: String,
    pub port: u16,
    pub password: Option<crate::manifest::plan::Secret>,
    /// A private key file (`sshPrivateKeySecret`).
    pub private_key: Option<PathBuf>,
    /// How a step's script runs.
    pub shell: StepShell,
}

/// How a shell step's script runs (`communicator.shell`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepShell {
    #[default]
    Bash,
    Sh,
    Powershell,
    Cmd,
}

/// The firmware a VM boots through; recorded in the module so clones boot the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF with the VM's own NVRAM.
    Uefi,
    /// OVMF's Secure Boot build, Microsoft keys enrolled, SMM on.
    UefiSecureBoot,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiSecureBoot => "uefi-secure-boot",
        }
    }

    /// Whether the firmware keeps variables (NVRAM) the VM needs its own copy of.
    pub fn has_nvram(self) -> bool {
        self != Firmware::Bios
    }
}

/// How a VM boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BootChoice {
    /// Direct kernel boot where kiln can read the image's kernel and nothing asks for
    /// firmware; firmware otherwise.
    #[default]
    Auto,
    /// Always kiln's direct kernel boot (fails when the image has no kernel kiln can read).
    Direct,
    /// Always through the firmware and the image's own boot loader.
    Firmware,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskJob {
    pub name: String,
    pub size_bytes: u64,
    pub bus: DiskBus,
}

/// How the guest sees a disk (`disks[].bus`). Whatever the bus, kiln-disk serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk: kiln's vhost-user-blk backend.
    #[default]
    Virtio,
    /// virtio-scsi (qemu engine), over kiln-disk's NBD export.
    Scsi,
    /// AHCI (qemu engine), over kiln-disk's NBD export.
    Sata,
}

impl DiskBus {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Scsi => "scsi",
            DiskBus::Sata => "sata",
        }
    }

    /// For `skip_serializing_if`: module records name only the buses that are not the default.
    pub fn is_virtio(&self) -> bool {
        *self == DiskBus::Virtio
    }
}

#[derive(Debug, Clone, Default)]
pub struct CloudInit {
    /// The user's cloud-config or script: `userData`, or the file `userDataFrom` names.
    pub user_data: Option<String>,
    pub network_data: Option<String>,
}

/// Where a VM's boot disk comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceSpec {
    /// A disk image downloaded once into the cache.
    Url { url: String, sha256: Option<String> },
    /// A local disk image (absolute, or already resolved against the manifest's folder).
    File { path: PathBuf },
    /// A Debian root built with mmdebstrap.
    Bootstrap(BootstrapSpec),
    /// A previous module's captured disk.
    BuildRef { module: String, vm: Option<String> },
    /// An empty disk.
    Blank,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootstrapSpec {
    pub distro: String,
    pub suite: String,
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    /// The kernel package instead of the cloud kernel (`bootstrap.kernel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

/// Content of a `files[]` entry.
#[derive(Debug, Clone)]
pub enum FileContent {
    Inline(String),
    Url(String),
    /// A URL the build fetched into the cache at its start: the blob at `path`.
    Cached {
        url: String,
        path: PathBuf,
    },
}

/// A provisioning step.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub timeout: Option<Duration>,
    /// False (`cache: false`): this step and every one after it run on every build.
    pub cache: bool,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    Shell {
        inline: String,
        env: BTreeMap<String, String>,
        /// Wraps the script; `{{ .Command }}` is replaced by the command that runs it.
        execute_command: Option<String>,
    },
    File {
        /// The name of a `files[]` entry.
        file: String,
        destination: String,
    },
    Reboot {
        command: Option<String>,
    },
    Handbuild {
        instructions: String,
    },
}

impl StepKind {
    pub fn label(&self) -> &'static str {
        match self {
            StepKind::Shell { .. } => "shell",
            StepKind::File { .. } => "file",
            StepKind::Reboot { .. } => "reboot",
            StepKind::Handbuild { .. } => "handbuild",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_yaml_of_an_earlier_kiln_reads_into_typed_values() {
        // As kiln wrote it while the job held MACs and CIDRs as text.
        let text = "network:
  vpcs:
  - name: lab
    internet: false
    hostAccess: false
  subnets:
  - name: lab
    vpc: lab
    cidr: 10.9.0.0/24
    dhcp: true
    unmanaged: false
    dns: []
vms:
- name: a
  cpus: 1
  memoryMib: 512
  nics:
  - name: eth0
    subnet: lab
    mac: 02:6b:6c:12:34:56
    ip: 10.9.0.10
  - name: eth1
    subnet: lab
    mac: 02:00:00:00:00:01
    model: e1000
";
        let b: BaseView = serde_saphyr::from_str(text).unwrap();
        assert_eq!(b.network.subnets[0].cidr, "10.9.0.0/24".parse().unwrap());
        let nics = &b.vm("a").unwrap().nics;
        assert_eq!(nics[0].mac.bytes(), [2, 0x6b, 0x6c, 0x12, 0x34, 0x56]);
        assert_eq!(nics[1].mac.bytes(), [2, 0, 0, 0, 0, 1]);
        // A NIC without `model` (every earlier kiln's) is virtio; clones keep the model.
        assert_eq!(nics[0].model, NicModel::Virtio);
        assert_eq!(nics[1].model, NicModel::E1000);
        // And what this kiln writes reads back the same.
        let again: BaseView =
            serde_saphyr::from_str(&serde_saphyr::to_string(&b).unwrap()).unwrap();
        assert_eq!(again, b);
        // A MAC no NIC can have is refused when the file is read.
        let bad = text.replace("02:00:00:00:00:01", "01:00:00:00:00:01");
        let e = serde_saphyr::from_str::<BaseView>(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a unicast MAC"), "{e}");
        // A model kiln does not serve is refused, never read as virtio.
        let bad = text.replace("model: e1000", "model: rtl8139");
        assert!(serde_saphyr::from_str::<BaseView>(&bad).is_err());
    }
}
