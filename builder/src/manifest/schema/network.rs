//! The module network: VPCs and their subnets.

use super::{f, req, Obj, Ty};

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
