//! The manifest's shape as data: every object, its fields, their types and one-line docs.
//! One table drives the structural check (unknown fields, types, required fields), the key
//! order of `kiln fmt` and the JSON Schema of `kiln schema`, so the three cannot disagree.

#[derive(Debug)]
pub enum Ty {
    /// Any scalar, read as its text.
    Str,
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    /// Go-style duration string.
    Duration,
    /// Kubernetes quantity of bytes.
    Bytes,
    /// Kubernetes cpu quantity.
    Cpu,
    Enum(&'static [&'static str]),
    /// Only the value `true` (`blank: true`).
    True,
    Obj(&'static Obj),
    List(&'static Ty),
    /// Environment: a mapping of NAME to value, or a list of `NAME=value`.
    Env,
    /// Anything (labels, annotations): not checked.
    Any,
}

#[derive(Debug)]
pub struct Obj {
    /// Stable identifier (JSON Schema `$defs` key).
    pub id: &'static str,
    /// How messages name it ("VM", "source").
    pub what: &'static str,
    pub fields: &'static [Field],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    None,
    /// Accepted, ignored with this warning.
    Ignored(&'static str),
}

#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub doc: &'static str,
    pub note: Note,
}

impl Obj {
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

const fn f(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        doc,
        note: Note::None,
    }
}

const fn req(name: &'static str, ty: Ty, doc: &'static str) -> Field {
    Field {
        name,
        ty,
        required: true,
        doc,
        note: Note::None,
    }
}

const fn ignored(name: &'static str, ty: Ty, doc: &'static str, why: &'static str) -> Field {
    Field {
        name,
        ty,
        required: false,
        doc,
        note: Note::Ignored(why),
    }
}

pub const BUSES: &[&str] = &["virtio", "scsi", "sata", "usb"];
pub const NIC_MODELS: &[&str] = &["virtio", "e1000", "e1000e", "rtl8139", "pcnet", "ne2k_pci"];
pub const PROVISIONER_TYPES: &[&str] = &["shell", "file", "reboot", "windows-update", "handbuild"];
pub const SOURCE_KINDS: &[&str] = &[
    "url",
    "blank",
    "buildRef",
    "containerDisk",
    "file",
    "bootstrap",
];

pub static ENVELOPE: Obj = Obj {
    id: "VirtualMachineBuild",
    what: "manifest envelope",
    fields: &[
        f(
            "apiVersion",
            Ty::Str,
            "API version of the envelope (not interpreted)",
        ),
        req(
            "kind",
            Ty::Enum(&["VirtualMachineBuild"]),
            "must be VirtualMachineBuild",
        ),
        f(
            "metadata",
            Ty::Obj(&METADATA),
            "metadata.name names the module",
        ),
        req("spec", Ty::Obj(&SPEC), "the manifest body"),
    ],
};

pub static METADATA: Obj = Obj {
    id: "Metadata",
    what: "metadata",
    fields: &[
        f("name", Ty::Str, "the module name (a DNS label)"),
        ignored(
            "namespace",
            Ty::Str,
            "cluster namespace",
            "cluster-only; kiln has no namespaces",
        ),
        f("labels", Ty::Any, "accepted, not interpreted"),
        f("annotations", Ty::Any, "accepted, not interpreted"),
    ],
};

pub static SPEC: Obj = Obj {
    id: "Manifest",
    what: "manifest",
    fields: &[
        req(
            "vms",
            Ty::List(&Ty::Obj(&VM)),
            "the module's VMs; they boot and provision in parallel",
        ),
        f(
            "files",
            Ty::List(&Ty::Obj(&FILE)),
            "named files used by httpDirectory, floppies and file steps",
        ),
        f(
            "network",
            Ty::Obj(&NETWORK),
            "the module's isolated network",
        ),
        f(
            "httpDirectory",
            Ty::Obj(&FILE_LIST),
            "files served over HTTP to the build's VMs during boot",
        ),
        f(
            "buildOverrides",
            Ty::Obj(&OVERRIDES),
            "values for the build only; clones get the base values",
        ),
        f(
            "timeout",
            Ty::Duration,
            "bounds the whole build (default 30m)",
        ),
        f(
            "retries",
            Ty::Int { min: 0, max: 10 },
            "automatic retries of a failed build (default 0)",
        ),
        f(
            "isoCacheTTL",
            Ty::Duration,
            "how long downloaded ISOs stay cached: 24h only (kiln does not download ISOs yet)",
        ),
        ignored(
            "namespace",
            Ty::Str,
            "cluster namespace",
            "cluster-only; ignored by kiln",
        ),
        ignored(
            "namespacePrefix",
            Ty::Str,
            "cluster namespace prefix",
            "cluster-only; ignored by kiln",
        ),
        ignored(
            "output",
            Ty::Any,
            "deprecated output settings",
            "deprecated and ignored by kiln",
        ),
    ],
};

pub static VM: Obj = Obj {
    id: "VM",
    what: "VM",
    fields: &[
        req(
            "name",
            Ty::Str,
            "unique DNS label; other VMs reach it by this name",
        ),
        req(
            "source",
            Ty::Obj(&SOURCE),
            "where the boot disk comes from: exactly one kind",
        ),
        req("resources", Ty::Obj(&RESOURCES), "guest vCPUs and memory"),
        f(
            "disks",
            Ty::List(&Ty::Obj(&DISK)),
            "first is the boot disk (default one 20Gi virtio disk)",
        ),
        f(
            "communicator",
            Ty::Obj(&COMMUNICATOR),
            "how the build reaches the guest",
        ),
        f(
            "cloudInit",
            Ty::Obj(&CLOUD_INIT),
            "attach a NoCloud seed ({} is enough)",
        ),
        f(
            "nics",
            Ty::List(&Ty::Obj(&NIC)),
            "network interfaces (default one NIC on the default subnet)",
        ),
        f(
            "bootCommand",
            Ty::List(&Ty::Str),
            "keystrokes typed at boot",
        ),
        f(
            "efiFirmware",
            Ty::Obj(&EFI),
            "UEFI boot (not supported by kiln yet: it boots the kernel directly)",
        ),
        f(
            "provisioners",
            Ty::List(&Ty::Obj(&PROVISIONER)),
            "steps run in order after boot",
        ),
        f("isos", Ty::List(&Ty::Obj(&ISO)), "CD-ROMs"),
        f(
            "floppy",
            Ty::Obj(&FILE_LIST),
            "a 1.44 MB FAT floppy built from files (build only)",
        ),
        f(
            "invisible",
            Ty::Bool,
            "hidden from consoles: false only (not supported by kiln yet)",
        ),
    ],
};

pub static SOURCE: Obj = Obj {
    id: "Source",
    what: "source",
    fields: &[
        f("url", Ty::Str, "a disk image (qcow2 or raw) to download"),
        f("checksum", Ty::Str, "sha256:<hex> of the url's image"),
        f("blank", Ty::True, "an empty boot disk; install from isos"),
        f(
            "buildRef",
            Ty::Obj(&BUILD_REF),
            "a previous module's captured disk",
        ),
        f(
            "containerDisk",
            Ty::Str,
            "an OCI reference (not supported by kiln yet)",
        ),
        f(
            "file",
            Ty::Str,
            "a local disk image, relative to the manifest",
        ),
        f(
            "bootstrap",
            Ty::Obj(&BOOTSTRAP),
            "a root file system built from distro packages",
        ),
    ],
};

pub static BUILD_REF: Obj = Obj {
    id: "BuildRef",
    what: "buildRef",
    fields: &[
        req("name", Ty::Str, "the module's name"),
        ignored(
            "namespace",
            Ty::Str,
            "cluster namespace",
            "cluster-only; kiln has no namespaces",
        ),
        f(
            "vmName",
            Ty::Str,
            "the VM of that module (required when it has several)",
        ),
    ],
};

pub static BOOTSTRAP: Obj = Obj {
    id: "Bootstrap",
    what: "bootstrap",
    fields: &[
        req("distro", Ty::Enum(&["debian"]), "the distribution"),
        req("suite", Ty::Str, "the release, e.g. bookworm"),
        f("packages", Ty::List(&Ty::Str), "extra packages to install"),
        f("mirror", Ty::Str, "the package mirror URL"),
    ],
};

pub static RESOURCES: Obj = Obj {
    id: "Resources",
    what: "resources",
    fields: &[
        req(
            "cpu",
            Ty::Cpu,
            "vCPUs: an integer or a quantity such as \"500m\" (rounded up)",
        ),
        req("memory", Ty::Bytes, "guest memory, e.g. 1Gi"),
    ],
};

pub static OVERRIDE_RESOURCES: Obj = Obj {
    id: "ResourcesOverride",
    what: "resources",
    fields: &[
        f("cpu", Ty::Cpu, "vCPUs for the build"),
        f("memory", Ty::Bytes, "memory for the build"),
    ],
};

pub static DISK: Obj = Obj {
    id: "Disk",
    what: "disk",
    fields: &[
        req("name", Ty::Str, "unique within the VM"),
        req("size", Ty::Bytes, "e.g. 20Gi"),
        f(
            "bus",
            Ty::Enum(BUSES),
            "virtio (default); scsi, sata and usb are not supported by kiln yet",
        ),
        ignored(
            "storageClass",
            Ty::Str,
            "cluster storage class",
            "cluster-only; ignored by kiln",
        ),
    ],
};

pub static COMMUNICATOR: Obj = Obj {
    id: "Communicator",
    what: "communicator",
    fields: &[
        f(
            "type",
            Ty::Enum(&["agent", "ssh"]),
            "agent (kiln's vsock agent) or ssh",
        ),
        f(
            "shell",
            Ty::Enum(&["bash", "powershell"]),
            "bash (default); powershell is not supported by kiln yet",
        ),
        f(
            "sshUsername",
            Ty::Str,
            "root only: steps run as root through kiln's agent",
        ),
        f(
            "sshPort",
            Ty::Int { min: 1, max: 65535 },
            "22 only (kiln does not use SSH yet)",
        ),
        f(
            "sshPassword",
            Ty::Str,
            "not supported by kiln yet (never printed)",
        ),
        f(
            "sshTimeout",
            Ty::Duration,
            "how long to wait for the guest's agent after boot (default 5m)",
        ),
        f(
            "sshPrivateKeySecret",
            Ty::Obj(&REF),
            "not supported by kiln yet (a key file: name is its path)",
        ),
    ],
};

pub static REF: Obj = Obj {
    id: "Ref",
    what: "reference",
    fields: &[
        req(
            "name",
            Ty::Str,
            "read by kiln as a path relative to the manifest",
        ),
        f("key", Ty::Str, "a file inside the directory `name`"),
    ],
};

pub static CONFIG_REF: Obj = Obj {
    id: "ConfigRef",
    what: "ConfigMap/Secret reference",
    fields: &[
        f("configMapRef", Ty::Obj(&REF), "read as a local file"),
        f("secretRef", Ty::Obj(&REF), "read as a local file"),
    ],
};

pub static CLOUD_INIT: Obj = Obj {
    id: "CloudInit",
    what: "cloudInit",
    fields: &[
        f("userData", Ty::Str, "cloud-init user data"),
        f(
            "userDataFrom",
            Ty::Obj(&CONFIG_REF),
            "user data from a local file",
        ),
        f("networkData", Ty::Str, "cloud-init network config"),
    ],
};

pub static NIC: Obj = Obj {
    id: "Nic",
    what: "NIC",
    fields: &[
        req("name", Ty::Str, "unique within the VM"),
        req("subnet", Ty::Str, "a subnet of network.subnets"),
        f(
            "slot",
            Ty::Int { min: 1, max: 9 },
            "1-9, the interface order in the guest",
        ),
        f("ip", Ty::Str, "a static address inside the subnet"),
        f("mac", Ty::Str, "xx:xx:xx:xx:xx:xx"),
        f(
            "model",
            Ty::Enum(NIC_MODELS),
            "virtio only; other models are not supported by kiln yet",
        ),
    ],
};

pub static EFI: Obj = Obj {
    id: "EfiFirmware",
    what: "efiFirmware",
    fields: &[f(
        "secureBoot",
        Ty::Bool,
        "Secure Boot (not supported by kiln yet)",
    )],
};

pub static PROVISIONER: Obj = Obj {
    id: "Provisioner",
    what: "provisioner",
    fields: &[
        f("name", Ty::Str, "shown in logs"),
        req("type", Ty::Enum(PROVISIONER_TYPES), "the kind of step"),
        f("stepTimeout", Ty::Duration, "bounds this step"),
        f("shell", Ty::Obj(&SHELL), "for type shell"),
        f("file", Ty::Obj(&FILE_STEP), "for type file"),
        f("reboot", Ty::Obj(&REBOOT), "for type reboot"),
        f(
            "windowsUpdate",
            Ty::Obj(&WINDOWS_UPDATE),
            "for type windows-update",
        ),
        f("handbuild", Ty::Obj(&HANDBUILD), "for type handbuild"),
    ],
};

pub static SHELL: Obj = Obj {
    id: "ShellStep",
    what: "shell step",
    fields: &[
        f("inline", Ty::Str, "the script"),
        f(
            "scriptFrom",
            Ty::Obj(&CONFIG_REF),
            "the script from a local file",
        ),
        f("env", Ty::Env, "environment variables"),
        f(
            "executeCommand",
            Ty::Str,
            "wraps the script; {{ .Command }} is the placeholder",
        ),
    ],
};

pub static FILE_STEP: Obj = Obj {
    id: "FileStep",
    what: "file step",
    fields: &[
        f("fileRef", Ty::Str, "a files[] entry"),
        f("source", Ty::Obj(&CONFIG_REF), "a local file"),
        req("destination", Ty::Str, "an absolute guest path"),
    ],
};

pub static REBOOT: Obj = Obj {
    id: "RebootStep",
    what: "reboot step",
    fields: &[f(
        "command",
        Ty::Str,
        "default `reboot` (bash) or `shutdown /r /f /t 0` (powershell)",
    )],
};

pub static WINDOWS_UPDATE: Obj = Obj {
    id: "WindowsUpdateStep",
    what: "windowsUpdate step",
    fields: &[
        f("searchCriteria", Ty::Str, "Windows Update search criteria"),
        f("filters", Ty::List(&Ty::Str), "update filters"),
        f(
            "updateLimit",
            Ty::Int {
                min: 0,
                max: 100_000,
            },
            "maximum updates",
        ),
    ],
};

pub static HANDBUILD: Obj = Obj {
    id: "HandbuildStep",
    what: "handbuild step",
    fields: &[req("instructions", Ty::Str, "what to do on the console")],
};

pub static ISO: Obj = Obj {
    id: "Iso",
    what: "ISO",
    fields: &[
        req("url", Ty::Str, "where to download it"),
        f("checksum", Ty::Str, "SHA-256 (sha256:<hex> or <hex>)"),
    ],
};

pub static FILE_LIST: Obj = Obj {
    id: "FileList",
    what: "file list",
    fields: &[f(
        "files",
        Ty::List(&Ty::Obj(&NAME_REF)),
        "names of files[] entries",
    )],
};

pub static NAME_REF: Obj = Obj {
    id: "FileName",
    what: "file reference",
    fields: &[req("name", Ty::Str, "a files[] entry")],
};

pub static FILE: Obj = Obj {
    id: "File",
    what: "file",
    fields: &[
        req("name", Ty::Str, "the file name wherever it lands"),
        f("inline", Ty::Str, "the contents"),
        f("url", Ty::Str, "where to download the contents"),
    ],
};

pub static NETWORK: Obj = Obj {
    id: "Network",
    what: "network",
    fields: &[
        f("vpcs", Ty::List(&Ty::Obj(&VPC)), "isolated networks"),
        f(
            "subnets",
            Ty::List(&Ty::Obj(&SUBNET)),
            "subnets inside VPCs",
        ),
    ],
};

pub static VPC: Obj = Obj {
    id: "Vpc",
    what: "VPC",
    fields: &[
        req("name", Ty::Str, "a DNS label"),
        f(
            "internet",
            Ty::Bool,
            "NAT to the outside (default false for declared VPCs)",
        ),
        f(
            "hostAccess",
            Ty::Bool,
            "kiln extension: guests may reach the host's own addresses through the NAT (default false)",
        ),
    ],
};

pub static SUBNET: Obj = Obj {
    id: "Subnet",
    what: "subnet",
    fields: &[
        req("name", Ty::Str, "a DNS label"),
        f("vpc", Ty::Str, "its VPC (default: the default VPC)"),
        req("cidr", Ty::Str, "e.g. 10.1.0.0/24"),
        f("dhcp", Ty::Bool, "serve DHCP (default true)"),
        f(
            "dns",
            Ty::Str,
            "upstream DNS servers, e.g. \"8.8.8.8,1.1.1.1\"",
        ),
        f("unmanaged", Ty::Bool, "no platform DHCP; /29 or wider"),
    ],
};

pub static OVERRIDES: Obj = Obj {
    id: "BuildOverrides",
    what: "buildOverrides",
    fields: &[
        f(
            "vpcs",
            Ty::List(&Ty::Obj(&OVERRIDE_VPC)),
            "VPC values for the build",
        ),
        f(
            "subnets",
            Ty::List(&Ty::Obj(&OVERRIDE_SUBNET)),
            "subnet values for the build",
        ),
        f(
            "vms",
            Ty::List(&Ty::Obj(&OVERRIDE_VM)),
            "VM values for the build",
        ),
    ],
};

pub static OVERRIDE_VPC: Obj = Obj {
    id: "VpcOverride",
    what: "VPC override",
    fields: &[
        req("name", Ty::Str, "a declared VPC"),
        f("internet", Ty::Bool, "internet for the build"),
    ],
};

pub static OVERRIDE_SUBNET: Obj = Obj {
    id: "SubnetOverride",
    what: "subnet override",
    fields: &[
        req("name", Ty::Str, "a declared subnet"),
        f("unmanaged", Ty::Bool, "unmanaged for the build"),
    ],
};

pub static OVERRIDE_VM: Obj = Obj {
    id: "VmOverride",
    what: "VM override",
    fields: &[
        req("name", Ty::Str, "a declared VM"),
        f(
            "resources",
            Ty::Obj(&OVERRIDE_RESOURCES),
            "resources for the build",
        ),
        f(
            "nics",
            Ty::List(&Ty::Obj(&NIC)),
            "replace the VM's NICs for the build",
        ),
    ],
};

/// Every object, for "this field belongs elsewhere" hints and the JSON Schema.
pub static ALL: &[&Obj] = &[
    &ENVELOPE,
    &METADATA,
    &SPEC,
    &VM,
    &SOURCE,
    &BUILD_REF,
    &BOOTSTRAP,
    &RESOURCES,
    &OVERRIDE_RESOURCES,
    &DISK,
    &COMMUNICATOR,
    &REF,
    &CONFIG_REF,
    &CLOUD_INIT,
    &NIC,
    &EFI,
    &PROVISIONER,
    &SHELL,
    &FILE_STEP,
    &REBOOT,
    &WINDOWS_UPDATE,
    &HANDBUILD,
    &ISO,
    &FILE_LIST,
    &NAME_REF,
    &FILE,
    &NETWORK,
    &VPC,
    &SUBNET,
    &OVERRIDES,
    &OVERRIDE_VPC,
    &OVERRIDE_SUBNET,
    &OVERRIDE_VM,
];
