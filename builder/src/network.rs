//! The module network of a build or of a running clone: one kiln-net [`Network`] built from the
//! job's VPCs and subnets, and one frame port per VM NIC. Both engines serve each port to the
//! guest as a virtio-net device (the `qemu` engine through kiln-vmm's vhost-user-net backend).
//!
//! Every build and every `kiln run` gets its own `Network`: VMs of one module reach each other
//! by name, nothing else reaches them, and only VPCs with internet get NAT to the host's sockets.

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_net::{FramePort, Ipv4Cidr, Network, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};

use crate::engine::{EngineError, NicAttach};
use crate::job::{NetJob, NicJob};

/// Whether VPCs get the internet access their manifest gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Internet {
    /// As the manifest says (`internet: true` VPCs NAT to the host's sockets).
    AsDeclared,
    /// Never: a hermetic build or run. Names of the module's VMs still resolve, and every
    /// outside connection is refused at once.
    Off,
}

/// kiln-net's configuration for a job's network.
pub fn config(job: &NetJob, internet: Internet) -> Result<NetworkConfig, EngineError> {
    let bad = |m: String| EngineError::Backend(format!("module network: {m}"));
    let vpcs = job
        .vpcs
        .iter()
        .map(|v| VpcConfig {
            name: v.name.clone(),
            internet: v.internet && internet == Internet::AsDeclared,
            host_access: v.host_access,
        })
        .collect();
    let mut subnets = Vec::new();
    for s in &job.subnets {
        // kiln-net takes /30 or wider (a `base.yaml` of another kiln may hold any prefix).
        let cidr = Ipv4Cidr::new(s.cidr.addr(), s.cidr.prefix_len())
            .map_err(|e| bad(format!("subnet `{}`: {e}", s.name)))?;
        subnets.push(SubnetConfig {
            name: s.name.clone(),
            vpc: s.vpc.clone(),
            cidr,
            dhcp: s.dhcp,
            unmanaged: s.unmanaged,
            dns: s.dns.iter().map(|ip| SocketAddr::from((*ip, 53))).collect(),
        });
    }
    Ok(NetworkConfig {
        vpcs,
        subnets,
        ..NetworkConfig::default()
    })
}

/// Starts the network (its own thread; dropping the `Network` stops it).
pub fn start(job: &NetJob, internet: Internet) -> Result<Network, EngineError> {
    Network::new(config(job, internet)?)
        .map_err(|e| EngineError::Backend(format!("starting the module network: {e}")))
}

/// The static addresses among `nics` (an `ip` on a managed subnet without DHCP) as the agent's
/// `net-config` links: nothing else configures them in the guest. Each gets its subnet's
/// prefix, the gateway as default route, and the subnet's `dns` servers (else the gateway).
pub fn static_links(job: &NetJob, net: &Network, nics: &[NicJob]) -> Vec<kiln_agent::LinkConfig> {
    nics.iter()
        .filter_map(|n| {
            let ip = n.ip?;
            let s = job.subnets.iter().find(|s| s.name == n.subnet)?;
            if s.dhcp || s.unmanaged {
                // DHCP gives the address as a fixed lease; unmanaged subnets are the guest's.
                return None;
            }
            let gateway = net.gateway(&s.name)?;
            Some(kiln_agent::LinkConfig {
                mac: n.mac.bytes(),
                address: ip,
                prefix: s.cidr.prefix_len(),
                gateway: Some(gateway),
                dns: if s.dns.is_empty() {
                    vec![gateway]
                } else {
                    s.dns.clone()
                },
                search: Vec::new(),
                lease_secs: kiln_agent::STATIC_LEASE,
            })
        })
        .collect()
}

/// Plugs a VM's NICs into the network; the ports go into its [`VmLaunch`](crate::engine::VmLaunch).
pub fn attach(net: &Network, vm: &str, nics: &[NicJob]) -> Result<Vec<NicAttach>, EngineError> {
    let mut out = Vec::new();
    for n in nics {
        let mac = n.mac.bytes();
        let port: Arc<dyn FramePort> = net
            .attach(NicConfig {
                vm_name: vm.to_string(),
                subnet: n.subnet.clone(),
                mac,
                fixed_ip: n.ip,
            })
            .map_err(|e| {
                EngineError::Backend(format!(
                    "VM `{vm}`: NIC `{}` on subnet `{}`: {e}",
                    n.name, n.subnet
                ))
            })?;
        out.push(NicAttach {
            name: n.name.clone(),
            mac,
            port,
            model: n.model,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{SubnetJob, VpcJob};

    fn job() -> NetJob {
        NetJob {
            vpcs: vec![
                VpcJob {
                    name: "lab".into(),
                    internet: true,
                    host_access: false,
                },
                VpcJob {
                    name: "dmz".into(),
                    internet: false,
                    host_access: false,
                },
            ],
            subnets: vec![
                SubnetJob {
                    name: "a".into(),
                    vpc: "lab".into(),
                    cidr: "10.1.0.0/24".parse().unwrap(),
                    dhcp: true,
                    unmanaged: false,
                    dns: vec!["192.0.2.53".parse().unwrap()],
                },
                SubnetJob {
                    name: "b".into(),
                    vpc: "dmz".into(),
                    cidr: "10.2.0.0/29".parse().unwrap(),
                    dhcp: false,
                    unmanaged: true,
                    dns: vec![],
                },
            ],
        }
    }

    #[test]
    fn config_follows_the_job_and_internet_off_wins() {
        let c = config(&job(), Internet::AsDeclared).unwrap();
        assert!(c.vpcs[0].internet && !c.vpcs[1].internet);
        assert_eq!(c.subnets[0].cidr.to_string(), "10.1.0.0/24");
        assert_eq!(c.subnets[0].dns, vec!["192.0.2.53:53".parse().unwrap()]);
        assert!(c.subnets[1].unmanaged && !c.subnets[1].dhcp);
        assert!(
            c.host_loopback_alias.is_none(),
            "no host loopback in builds"
        );
        let off = config(&job(), Internet::Off).unwrap();
        assert!(off.vpcs.iter().all(|v| !v.internet));
        assert!(c.vpcs.iter().all(|v| !v.host_access));
        let mut j = job();
        j.vpcs[0].host_access = true;
        let c = config(&j, Internet::AsDeclared).unwrap();
        assert!(c.vpcs[0].host_access && !c.vpcs[1].host_access);
    }

    #[test]
    fn static_links_are_the_ips_on_subnets_without_dhcp() {
        let mut j = job();
        j.subnets.push(SubnetJob {
            name: "c".into(),
            vpc: "lab".into(),
            cidr: "10.3.0.0/16".parse().unwrap(),
            dhcp: false,
            unmanaged: false,
            dns: vec![],
        });
        j.subnets[0].dhcp = false;
        let net = start(&j, Internet::Off).unwrap();
        let nic = |name: &str, subnet: &str, ip: Option<&str>| NicJob {
            name: name.into(),
            subnet: subnet.into(),
            mac: format!("02:00:00:00:00:{:02x}", name.len())
                .parse()
                .unwrap(),
            ip: ip.map(|i| i.parse().unwrap()),
            model: Default::default(),
        };
        let links = static_links(
            &j,
            &net,
            &[
                nic("a", "a", Some("10.1.0.9")),
                nic("bb", "b", Some("10.2.0.3")),
                nic("ccc", "c", Some("10.3.4.5")),
                nic("dddd", "c", None),
            ],
        );
        assert_eq!(
            links.len(),
            2,
            "unmanaged and address-less NICs are not kiln's"
        );
        assert_eq!(
            links[0].address,
            "10.1.0.9".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(links[0].prefix, 24);
        assert_eq!(links[0].gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(
            links[0].dns,
            vec!["192.0.2.53".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert!(links[0].is_static());
        assert_eq!(links[0].mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(links[1].prefix, 16);
        assert_eq!(links[1].gateway, Some("10.3.0.1".parse().unwrap()));
        assert_eq!(
            links[1].dns,
            links[1].gateway.into_iter().collect::<Vec<_>>()
        );
        // With DHCP on, an `ip` is a fixed lease: the handover's lease path gives it.
        j.subnets[0].dhcp = true;
        assert!(static_links(&j, &net, &[nic("a", "a", Some("10.1.0.9"))]).is_empty());
    }

    #[test]
    fn bad_cidr_and_bad_mac_are_errors_not_panics() {
        // A CIDR is typed: one no network can have is refused where it is read, and one
        // kiln-net cannot serve when the network is configured.
        assert!("10.1.0.0/33".parse::<ipnet::Ipv4Net>().is_err());
        let mut j = job();
        j.subnets[0].cidr = "10.1.0.0/31".parse().unwrap();
        let e = config(&j, Internet::Off).unwrap_err().to_string();
        assert!(e.contains("subnet `a`"), "{e}");

        let net = start(&job(), Internet::Off).unwrap();
        let nic = |mac: &str, subnet: &str| NicJob {
            name: "eth0".into(),
            subnet: subnet.into(),
            mac: mac.parse().unwrap(),
            ip: None,
            model: Default::default(),
        };
        // A MAC is typed too: a multicast one never reaches a NIC.
        let e = "01:00:00:00:00:01"
            .parse::<crate::mac::Mac>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a unicast MAC"), "{e}");
        let e = attach(&net, "vm", &[nic("02:00:00:00:00:01", "nope")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("NIC `eth0` on subnet `nope`"), "{e}");
        let ok = attach(&net, "vm", &[nic("02:00:00:00:00:01", "a")]).unwrap();
        assert_eq!(ok[0].mac, [2, 0, 0, 0, 0, 1]);
        // The same MAC twice on one network is refused (kiln-net's anti-spoofing).
        assert!(attach(&net, "vm2", &[nic("02:00:00:00:00:01", "a")]).is_err());
    }
}
