//! A VM's part of the manifest: its source, resources, disks, communicator, cloud-init,
//! NICs, firmware and CD-ROMs.

use super::files::{CONFIG_REF, FILE_LIST, REF};
use super::provisioning::PROVISIONER;
use super::{f, ignored, req, Obj, Ty};

pub const BUSES: &[&str] = &["virtio", "scsi", "sata", "usb"];

pub const NIC_MODELS: &[&str] = &["virtio", "e1000", "e1000e", "rtl8139", "pcnet", "ne2k_pci"];

pub const SOURCE_KINDS: &[&str] = &[
    "url",
    "blank",
    "buildRef",
    "containerDisk",
    "file",
    "bootstrap",
];

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
            "bootWait",
            Ty::Duration,
            "kiln extension: how long after the VM starts the boot command is typed (default 10s)",
        ),
        f(
            "bootKeyInterval",
            Ty::Duration,
            "kiln extension: the pause after each key of the boot command (default 100ms)",
        ),
        f(
            "efiFirmware",
            Ty::Obj(&EFI),
            "UEFI boot through OVMF ({} is enough; BIOS when absent)",
        ),
        f(
            "boot",
            Ty::Enum(&["auto", "direct", "firmware"]),
            "kiln extension: direct kernel boot or firmware (default auto: direct when kiln can read the image's kernel and nothing asks for firmware)",
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
        f(
            "kernel",
            Ty::Str,
            "kiln extension: the kernel package (default linux-image-cloud-amd64; linux-image-amd64 for e1000, AHCI and other drivers the cloud kernel lacks)",
        ),
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

pub static DISK: Obj = Obj {
    id: "Disk",
    what: "disk",
    fields: &[
        req("name", Ty::Str, "unique within the VM"),
        req("size", Ty::Bytes, "e.g. 20Gi"),
        f(
            "bus",
            Ty::Enum(BUSES),
            "virtio (default); scsi or sata (qemu engine) for guests without virtio drivers; usb is not supported",
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
            "agent (kiln's vsock agent, the default) or ssh: the guest's own sshd, only where kiln cannot put its agent in (a blank disk, a url/file image without cloudInit)",
        ),
        f(
            "shell",
            Ty::Enum(&["bash", "sh", "powershell", "cmd"]),
            "how a step's script runs over SSH: bash (default), sh, powershell or cmd; the agent runs bash",
        ),
        f(
            "sshUsername",
            Ty::Str,
            "type: ssh: the user steps run as (default root)",
        ),
        f(
            "sshPort",
            Ty::Int { min: 1, max: 65535 },
            "type: ssh: the guest's sshd port (default 22)",
        ),
        f(
            "sshPassword",
            Ty::Str,
            "type: ssh: the login password (never printed)",
        ),
        f(
            "sshTimeout",
            Ty::Duration,
            "how long to wait for the guest's agent or sshd after boot (default 5m)",
        ),
        f(
            "sshPrivateKeySecret",
            Ty::Obj(&REF),
            "type: ssh: an OpenSSH private key file (name is its path)",
        ),
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
            "virtio (default); e1000, e1000e for guests without virtio drivers (qemu engine)",
        ),
    ],
};

pub static EFI: Obj = Obj {
    id: "EfiFirmware",
    what: "efiFirmware",
    fields: &[f(
        "secureBoot",
        Ty::Bool,
        "Secure Boot: OVMF's secure-boot build with Microsoft's keys enrolled",
    )],
};

pub static ISO: Obj = Obj {
    id: "Iso",
    what: "ISO",
    fields: &[
        req("url", Ty::Str, "where to download it"),
        f("checksum", Ty::Str, "SHA-256 (sha256:<hex> or <hex>)"),
    ],
};
