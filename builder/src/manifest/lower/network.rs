//! The network section, NICs, `buildOverrides`, and the per-view address checks.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::super::diag::Span;
use super::super::netaddr::{self, derived_mac};
use super::super::plan::{Network, Nic, NicModel, Subnet, Vm, Vpc};
use super::super::yaml::Node;
use super::resources::check_resources;
use super::{read, Cx};

pub const DEFAULT_VPC: &str = "default";
pub const DEFAULT_SUBNET: &str = "default";
pub const DEFAULT_CIDR: &str = "10.0.2.0/24";

/// The declared network with defaults filled in, plus where each subnet was written.
pub struct Declared {
    pub plan: Network,
    /// The subnet a VM without `nics` joins.
    pub default_subnet: String,
    /// VPCs listed in `network.vpcs` (the only ones `buildOverrides` may name).
    pub declared_vpcs: Vec<String>,
    /// `dhcp` as written per subnet, for overrides that turn `unmanaged` off.
    pub declared_dhcp: HashMap<String, bool>,
}

impl Declared {
    pub fn subnet_names(&self) -> Vec<String> {
        self.plan.subnets.iter().map(|s| s.name.clone()).collect()
    }
}

/// Where a NIC's fields were written, for the view checks.
#[derive(Debug, Clone, Copy)]
pub struct NicAt {
    pub name: Span,
    pub ip: Option<Span>,
    pub mac: Option<Span>,
}

pub struct Lowered {
    pub vm: Vm,
    pub nic_at: Vec<NicAt>,
}

pub fn declared(cx: &mut Cx, n: Option<&Node>) -> Declared {
    let empty = Node {
        span: Span::point(1, 1),
        kind: super::super::yaml::Kind::Null,
    };
    let n = n.unwrap_or(&empty);
    let vpc_nodes = read::list(n, "vpcs");
    let subnet_nodes = read::list(n, "subnets");
    cx.unique_names(vpc_nodes, "name", "VPC");
    cx.unique_names(subnet_nodes, "name", "subnet");
    let mut vpcs: Vec<Vpc> = Vec::new();
    for v in vpc_nodes {
        let Some(name) = v.get("name") else { continue };
        if !cx.label(name, "VPC name") {
            continue;
        }
        let name = name.as_str().unwrap_or_default().to_string();
        if vpcs.iter().any(|x| x.name == name) {
            continue;
        }
        vpcs.push(Vpc {
            name,
            internet: read::boolean(v, "internet").unwrap_or(false),
            host_access: read::boolean(v, "hostAccess").unwrap_or(false),
        });
    }
    let declared_vpcs: Vec<String> = vpcs.iter().map(|v| v.name.clone()).collect();
    let mut vpc_names = declared_vpcs.clone();
    if !vpc_names.iter().any(|v| v == DEFAULT_VPC) {
        vpc_names.push(DEFAULT_VPC.to_string());
    }
    let mut subnets: Vec<Subnet> = Vec::new();
    let mut cidr_at: Vec<(String, Span)> = Vec::new();
    let mut declared_dhcp = HashMap::new();
    for s in subnet_nodes {
        let Some(name_node) = s.get("name") else {
            continue;
        };
        if !cx.label(name_node, "subnet name") {
            continue;
        }
        let name = name_node.as_str().unwrap_or_default().to_string();
        if subnets.iter().any(|x| x.name == name) {
            continue;
        }
        let vpc = match s.get("vpc") {
            Some(v) if v.as_str().is_some() => match cx.reference(v, "VPC", &vpc_names) {
                Some(v) => v,
                None => continue,
            },
            _ => DEFAULT_VPC.to_string(),
        };
        let Some(cidr_node) = s.get("cidr") else {
            continue;
        };
        let Some(cidr_text) = cidr_node.as_str() else {
            continue;
        };
        let cidr = match netaddr::parse_cidr(cidr_text) {
            Ok(c) => c,
            Err((msg, hint)) => {
                let b = cx.sink.error(cidr_node.span, msg);
                if let Some(h) = hint {
                    b.hint(h);
                }
                continue;
            }
        };
        let unmanaged = read::boolean(s, "unmanaged").unwrap_or(false);
        if unmanaged && cidr.prefix_len() > 29 {
            cx.sink
                .error(
                    cidr_node.span,
                    format!(
                        "unmanaged subnet `{name}` is /{}: unmanaged subnets must be /29 or wider",
                        cidr.prefix_len()
                    ),
                )
                .hint("the gateway sits at the second-to-last usable address; widen the CIDR");
        }
        for (other, _) in &cidr_at {
            if let Some(o) = subnets.iter().find(|x| &x.name == other) {
                if o.vpc == vpc && netaddr::overlaps(&o.cidr, &cidr) {
                    cx.sink
                        .error(
                            cidr_node.span,
                            format!(
                                "{cidr} overlaps subnet `{}` ({}) in VPC `{vpc}`",
                                o.name, o.cidr
                            ),
                        )
                        .hint("subnets of one VPC need disjoint address ranges");
                }
            }
        }
        let mut dns = Vec::new();
        if let Some(d) = s.get("dns") {
            if let Some(text) = d.as_str() {
                for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match part.parse::<Ipv4Addr>() {
                        Ok(ip) => dns.push(ip),
                        Err(_) => {
                            cx.sink
                                .error(
                                    d.span,
                                    format!("DNS server `{part}` is not an IPv4 address"),
                                )
                                .hint(
                                    "write addresses separated by commas, e.g. \"8.8.8.8,1.1.1.1\"",
                                );
                        }
                    }
                }
            }
        }
        cidr_at.push((name.clone(), cidr_node.span));
        declared_dhcp.insert(name.clone(), read::boolean(s, "dhcp").unwrap_or(true));
        subnets.push(Subnet {
            gateway: netaddr::gateway(&cidr, unmanaged),
            name,
            vpc,
            cidr,
            // Unmanaged subnets get no platform DHCP whatever `dhcp` says.
            dhcp: read::boolean(s, "dhcp").unwrap_or(true) && !unmanaged,
            dns,
            unmanaged,
        });
    }
    let default_subnet = match subnets.first() {
        Some(s) => s.name.clone(),
        None if subnet_nodes.is_empty() => {
            let cidr = DEFAULT_CIDR.parse().unwrap_or_default();
            subnets.push(Subnet {
                name: DEFAULT_SUBNET.into(),
                vpc: DEFAULT_VPC.into(),
                gateway: netaddr::gateway(&cidr, false),
                cidr,
                dhcp: true,
                dns: Vec::new(),
                unmanaged: false,
            });
            DEFAULT_SUBNET.into()
        }
        None => String::new(),
    };
    // The implicit default VPC exists when something lives in it; it has internet.
    if !vpcs.iter().any(|v| v.name == DEFAULT_VPC) && subnets.iter().any(|s| s.vpc == DEFAULT_VPC) {
        vpcs.insert(
            0,
            Vpc {
                name: DEFAULT_VPC.into(),
                internet: true,
                // Guests never reach the host's own services unless a manifest says so.
                host_access: false,
            },
        );
    }
    Declared {
        plan: Network { vpcs, subnets },
        default_subnet,
        declared_vpcs,
        declared_dhcp,
    }
}

/// The NICs of one VM (or of one VM override). `base` holds the VM's base NICs when lowering
/// an override list: a NIC of the same name keeps their mac, slot and model.
pub fn nics(
    cx: &mut Cx,
    vm: &str,
    items: &[Node],
    net: &Declared,
    base: &[Nic],
) -> (Vec<Nic>, Vec<NicAt>) {
    cx.unique_names(items, "name", "NIC");
    let subnets = net.subnet_names();
    let mut out: Vec<(Nic, NicAt, bool)> = Vec::new();
    let mut used_slots: Vec<(u8, String, Span)> = Vec::new();
    for (i, n) in items.iter().enumerate() {
        if i == 9 {
            cx.sink
                .error(
                    n.span,
                    format!("VM `{vm}` has {} NICs: at most 9 are allowed", items.len()),
                )
                .hint("slots run from 1 to 9");
        }
        let Some(name_node) = n.get("name") else {
            continue;
        };
        if !cx.label(name_node, "NIC name") {
            continue;
        }
        let name = name_node.as_str().unwrap_or_default().to_string();
        if out.iter().any(|(x, _, _)| x.name == name) {
            continue;
        }
        let Some(subnet) = n
            .get("subnet")
            .and_then(|s| cx.reference(s, "subnet", &subnets))
        else {
            continue;
        };
        let vpc = net
            .plan
            .subnet(&subnet)
            .map(|s| s.vpc.clone())
            .unwrap_or_default();
        let prior = base.iter().find(|b| b.name == name);
        let slot_given = read::int(n, "slot")
            .filter(|s| (1..=9).contains(s))
            .map(|s| s as u8);
        if let (Some(s), Some(at)) = (slot_given, n.get("slot")) {
            if let Some((_, other, _)) = used_slots.iter().find(|(u, _, _)| *u == s) {
                cx.sink
                    .error(
                        at.span,
                        format!("slot {s} is already used by NIC `{other}` of VM `{vm}`"),
                    )
                    .hint("each NIC of a VM needs its own slot (1-9)");
            } else {
                used_slots.push((s, name.clone(), at.span));
            }
        }
        let ip = match n.get("ip") {
            Some(ipn) => {
                match ipn.as_str().map(str::parse::<Ipv4Addr>) {
                    Some(Ok(ip)) => Some(ip),
                    Some(Err(_)) => {
                        cx.sink
                        .error(ipn.span, format!("`{}` is not an IPv4 address", ipn.as_str().unwrap_or_default()))
                        .hint("write a static address such as 10.0.2.10, or leave `ip` out for DHCP");
                        None
                    }
                    None => None,
                }
            }
            None => None,
        };
        let mac = match n.get("mac") {
            Some(m) => match m.as_str().map(netaddr::parse_mac) {
                Some(Ok(mac)) => mac,
                Some(Err(e)) => {
                    cx.sink
                        .error(m.span, e)
                        .hint("write six hex bytes, e.g. 52:54:00:12:34:56");
                    continue;
                }
                None => continue,
            },
            None => match prior {
                Some(p) => p.mac.clone(),
                None => derive(cx, vm, &name),
            },
        };
        let model = match n.get("model") {
            Some(at) => match at.as_str().map(|m| (m, model_of(m))) {
                Some((_, Ok(model))) => model,
                Some((m, Err(()))) => {
                    // RudderVirt lists these; serving them as virtio would give the guest
                    // another NIC than the manifest asked for.
                    cx.sink
                        .error(at.span, format!("NIC model `{m}` is not supported by kiln"))
                        .hint("write `model: virtio`, or `e1000`/`e1000e` for a guest without virtio drivers");
                    NicModel::Virtio
                }
                // Not a string: the schema check reports it.
                None => NicModel::Virtio,
            },
            None => prior.map_or(NicModel::Virtio, |p| p.model),
        };
        let slot = slot_given.or_else(|| {
            if n.get("slot").is_none() {
                prior.map(|p| p.slot)
            } else {
                None
            }
        });
        out.push((
            Nic {
                name,
                subnet,
                vpc,
                slot: slot.unwrap_or(0),
                ip,
                mac,
                model,
            },
            NicAt {
                name: name_node.span,
                ip: n.get("ip").map(|i| i.span),
                mac: n.get("mac").map(|m| m.span),
            },
            slot.is_some(),
        ));
    }
    // NICs without a slot take the lowest free ones, in order.
    let mut taken: Vec<u8> = out
        .iter()
        .filter(|(_, _, given)| *given)
        .map(|(n, _, _)| n.slot)
        .collect();
    for (nic, _, given) in out.iter_mut() {
        if !*given {
            let free = (1..=9u8).find(|s| !taken.contains(s)).unwrap_or(0);
            nic.slot = free;
            taken.push(free);
        }
    }
    out.into_iter().map(|(n, a, _)| (n, a)).unzip()
}

pub fn default_nic(cx: &mut Cx, vm: &str, net: &Declared) -> Option<Nic> {
    let subnet = net.plan.subnet(&net.default_subnet)?;
    Some(Nic {
        name: "eth0".into(),
        subnet: subnet.name.clone(),
        vpc: subnet.vpc.clone(),
        slot: 1,
        ip: None,
        mac: derive(cx, vm, "eth0"),
        model: NicModel::Virtio,
    })
}

fn derive(cx: &Cx, vm: &str, nic: &str) -> String {
    let key = format!("{}/{vm}/{nic}", cx.module);
    (0..64)
        .map(|a| derived_mac(&key, a))
        .find(|m| !cx.explicit_macs.contains(m))
        .unwrap_or_else(|| derived_mac(&key, 64))
}

/// The model named `m`; `Err` for the models the schema lists but kiln does not serve, `Ok`
/// virtio for a name the schema check already refused.
fn model_of(m: &str) -> Result<NicModel, ()> {
    match m {
        "e1000" => Ok(NicModel::E1000),
        "e1000e" => Ok(NicModel::E1000e),
        "rtl8139" | "pcnet" | "ne2k_pci" => Err(()),
        _ => Ok(NicModel::Virtio),
    }
}

/// Apply `buildOverrides` to a copy of the base network and VMs.
pub fn apply_overrides(
    cx: &mut Cx,
    o: Option<&Node>,
    net: &Declared,
    vms: &[Lowered],
    vm_nodes: &[Node],
) -> (Network, Vec<Lowered>) {
    let mut network = net.plan.clone();
    let mut out: Vec<Lowered> = vms
        .iter()
        .map(|l| Lowered {
            vm: l.vm.clone(),
            nic_at: l.nic_at.clone(),
        })
        .collect();
    let Some(o) = o else { return (network, out) };
    let declared_vpcs: Vec<String> = net.declared_vpcs.clone();
    let ovpcs = read::list(o, "vpcs");
    cx.unique_names(ovpcs, "name", "VPC override");
    for v in ovpcs {
        let Some(n) = v.get("name") else { continue };
        let Some(name) = cx.reference(n, "VPC", &declared_vpcs) else {
            continue;
        };
        if let (Some(internet), Some(vpc)) = (
            read::boolean(v, "internet"),
            network.vpcs.iter_mut().find(|x| x.name == name),
        ) {
            vpc.internet = internet;
        }
    }
    let osubnets = read::list(o, "subnets");
    cx.unique_names(osubnets, "name", "subnet override");
    let subnet_names = net.subnet_names();
    for s in osubnets {
        let Some(n) = s.get("name") else { continue };
        let Some(name) = cx.reference(n, "subnet", &subnet_names) else {
            continue;
        };
        let Some(unmanaged) = read::boolean(s, "unmanaged") else {
            continue;
        };
        if let Some(sub) = network.subnets.iter_mut().find(|x| x.name == name) {
            if unmanaged {
                sub.dhcp = false;
            } else if sub.unmanaged {
                // Back to managed for the build: DHCP as declared (default on).
                sub.dhcp = net.declared_dhcp.get(&name).copied().unwrap_or(true);
            }
            sub.unmanaged = unmanaged;
            sub.gateway = netaddr::gateway(&sub.cidr, unmanaged);
            if unmanaged && sub.cidr.prefix_len() > 29 {
                let at = s.get("unmanaged").map_or(n.span, |u| u.span);
                cx.sink
                    .error(
                        at,
                        format!(
                            "subnet `{name}` is /{}: unmanaged subnets must be /29 or wider",
                            sub.cidr.prefix_len()
                        ),
                    )
                    .hint("widen the subnet's CIDR");
            }
        }
    }
    let ovms = read::list(o, "vms");
    cx.unique_names(ovms, "name", "VM override");
    let vm_names: Vec<String> = vm_nodes
        .iter()
        .filter_map(|v| read::string(v, "name"))
        .collect();
    for ov in ovms {
        let Some(n) = ov.get("name") else { continue };
        let Some(name) = cx.reference(n, "VM", &vm_names) else {
            continue;
        };
        let Some(target) = out.iter_mut().find(|l| l.vm.name == name) else {
            continue;
        };
        if let Some(r) = read::node(ov, "resources") {
            if let Some(c) = read::cpus(r, "cpu") {
                target.vm.cpus = c;
            }
            if let Some(m) = read::bytes(r, "memory") {
                target.vm.memory = m;
            }
            check_resources(cx, r, &target.vm);
        }
        if ov.get("nics").is_some() {
            let items = read::list(ov, "nics");
            let (nics, at) = nics(cx, &name, items, net, &target.vm.nics.clone());
            target.vm.nics = nics;
            target.nic_at = at;
        }
    }
    (network, out)
}

/// Address checks that depend on the whole view: static IPs inside their subnet and unique,
/// MACs unique across the module.
pub fn check_view(cx: &mut Cx, network: &Network, vms: &[&Lowered]) {
    let mut ips: HashMap<(String, Ipv4Addr), (String, String)> = HashMap::new();
    let mut macs: HashMap<String, (String, String)> = HashMap::new();
    for (i, l) in vms.iter().enumerate() {
        // A repeated VM name is reported already; its NICs would only collide with themselves.
        if vms[..i].iter().any(|p| p.vm.name == l.vm.name) {
            continue;
        }
        for (nic, at) in l.vm.nics.iter().zip(&l.nic_at) {
            let owner = (l.vm.name.clone(), nic.name.clone());
            if let Some(sub) = network.subnet(&nic.subnet) {
                if nic.ip.is_none() && !sub.dhcp && !sub.unmanaged {
                    cx.sink
                        .error(
                            at.name,
                            format!(
                                "NIC `{}` of VM `{}` has no `ip` on subnet `{}`, which has `dhcp: false`: nothing would configure it",
                                nic.name, l.vm.name, sub.name
                            ),
                        )
                        .hint(format!(
                            "give it a static `ip` in {} (kiln's agent configures it in the guest), turn `dhcp` on, or make the subnet `unmanaged` if the guest configures itself",
                            sub.cidr
                        ));
                }
            }
            if let (Some(ip), Some(sub)) = (nic.ip, network.subnet(&nic.subnet)) {
                let at_ip = at.ip.unwrap_or(at.name);
                if !sub.cidr.contains(&ip) {
                    cx.sink
                        .error(
                            at_ip,
                            format!("{ip} is outside subnet `{}` ({})", sub.name, sub.cidr),
                        )
                        .hint(format!("pick an address in {}", sub.cidr));
                } else if ip == sub.cidr.network() || ip == sub.cidr.broadcast() {
                    cx.sink
                        .error(
                            at_ip,
                            format!("{ip} is the network or broadcast address of {}", sub.cidr),
                        )
                        .hint("pick a host address");
                } else if ip == sub.gateway {
                    cx.sink
                        .error(
                            at_ip,
                            format!("{ip} is the gateway of subnet `{}`", sub.name),
                        )
                        .hint("pick another host address");
                } else if let Some((v, n)) = ips.get(&(sub.name.clone(), ip)) {
                    cx.sink
                        .error(
                            at_ip,
                            format!("{ip} is already used by NIC `{n}` of VM `{v}`"),
                        )
                        .hint("static IPs must be unique within a subnet");
                } else {
                    ips.insert((sub.name.clone(), ip), owner.clone());
                }
            }
            if let Some((v, n)) = macs.get(&nic.mac) {
                cx.sink
                    .error(
                        at.mac.unwrap_or(at.name),
                        format!("MAC {} is already used by NIC `{n}` of VM `{v}`", nic.mac),
                    )
                    .hint("MACs must be unique across the module");
            } else {
                macs.insert(nic.mac.clone(), owner);
            }
        }
    }
}
