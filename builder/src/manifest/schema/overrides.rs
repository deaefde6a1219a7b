//! `buildOverrides`: what the build changes in the network and VMs it inherits from the
//! base view.

use super::vm::NIC;
use super::{f, req, Obj, Ty};

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

pub static OVERRIDE_RESOURCES: Obj = Obj {
    id: "ResourcesOverride",
    what: "resources",
    fields: &[
        f("cpu", Ty::Cpu, "vCPUs for the build"),
        f("memory", Ty::Bytes, "memory for the build"),
    ],
};
