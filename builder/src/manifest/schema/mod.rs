//! The manifest's shape as data: every object, its fields, their types and one-line docs.
//! One table drives the structural check (unknown fields, types, required fields), the key
//! order of `kiln fmt` and the JSON Schema of `kiln schema`, so the three cannot disagree.
//!
//! This file holds the table's types, the envelope and the spec, and [`ALL`]; each part of
//! the spec has its own file (VMs, provisioners, files, the network, build overrides).

mod files;
mod network;
mod overrides;
mod provisioning;
mod vm;

pub use files::{CONFIG_REF, FILE, FILE_LIST, NAME_REF, REF};
pub use network::{NETWORK, SUBNET, VPC};
pub use overrides::{OVERRIDES, OVERRIDE_RESOURCES, OVERRIDE_SUBNET, OVERRIDE_VM, OVERRIDE_VPC};
pub use provisioning::{
    FILE_STEP, HANDBUILD, PROVISIONER, PROVISIONER_TYPES, REBOOT, SHELL, WINDOWS_UPDATE,
};
pub use vm::{
    BOOTSTRAP, BUILD_REF, BUSES, CLOUD_INIT, COMMUNICATOR, DISK, EFI, ISO, NIC, NIC_MODELS,
    RESOURCES, SOURCE, SOURCE_KINDS, VM,
};

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
            "how long a cached ISO is trusted before its SHA-256 is checked again (default 24h)",
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
