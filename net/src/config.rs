//! What the builder tells a [`crate::Network`] to build: VPCs, subnets, NICs.
//!
//! The builder maps its Plan onto these types, so kiln-net depends on no other kiln crate.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// One VPC: subnets in it reach each other through their gateways; VPCs never reach each other.
#[derive(Debug, Clone)]
pub struct VpcConfig {
    pub name: String,
    /// Guest flows to outside addresses are carried on host sockets (NAT) only when true.
    pub internet: bool,
    /// Guests may reach the host's own addresses (those of its interfaces, link-local ones)
    /// through the NAT. Off: such flows are refused like a closed port. Loopback never opens.
    pub host_access: bool,
}

/// One subnet (one L2 segment with one gateway).
#[derive(Debug, Clone)]
pub struct SubnetConfig {
    pub name: String,
    pub vpc: String,
    pub cidr: Ipv4Cidr,
    /// Serve DHCP (ignored on unmanaged subnets, which never get DHCP).
    pub dhcp: bool,
    /// Unmanaged: no DHCP, gateway at the second-to-last usable address.
    pub unmanaged: bool,
    /// Upstream resolvers for names that are not VM names (port included, 53 normally).
    /// Empty: the host's resolvers from /etc/resolv.conf.
    pub dns: Vec<SocketAddr>,
}

/// The whole build network.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub vpcs: Vec<VpcConfig>,
    pub subnets: Vec<SubnetConfig>,
    /// DHCP lease time.
    pub lease_time: Duration,
    /// An outside address that the NAT carries to the host's 127.0.0.1 (like slirp's
    /// 10.0.2.2): a guest in a VPC with internet connecting to `alias:port` reaches
    /// `127.0.0.1:port` on the host. `None` (the default) maps nothing; tests use it so that
    /// NAT traffic never leaves the host.
    pub host_loopback_alias: Option<Ipv4Addr>,
    /// Bounds on NAT state per subnet gateway: a guest opening more flows is refused.
    pub max_flows_per_subnet: usize,
    /// Bound on NAT flows of one guest address, so one guest cannot use up its subnet's.
    pub max_flows_per_guest: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            vpcs: Vec::new(),
            subnets: Vec::new(),
            lease_time: Duration::from_secs(3600),
            host_loopback_alias: None,
            max_flows_per_subnet: 512,
            max_flows_per_guest: 128,
        }
    }
}

/// One NIC to plug into the switch.
#[derive(Debug, Clone)]
pub struct NicConfig {
    /// The VM's name: its DHCP hostname and its DNS name inside the VPC.
    pub vm_name: String,
    pub subnet: String,
    pub mac: [u8; 6],
    /// A fixed DHCP lease (managed subnets) or the address the guest configures itself.
    pub fixed_ip: Option<Ipv4Addr>,
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, ConfigError> {
        if prefix > 30 {
            return Err(ConfigError::Cidr(format!(
                "{addr}/{prefix}: prefix must be /30 or wider"
            )));
        }
        let c = Ipv4Cidr { addr, prefix };
        Ok(Ipv4Cidr {
            addr: c.network(),
            prefix,
        })
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
    /// Usable host addresses (network+1 ..= broadcast-1).
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }
    pub fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.broadcast()) - 1)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| ConfigError::Cidr(format!("{s}: expected ADDRESS/PREFIX")))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| ConfigError::Cidr(format!("{s}: bad address")))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| ConfigError::Cidr(format!("{s}: bad prefix")))?;
        Ipv4Cidr::new(addr, prefix)
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("bad CIDR {0}")]
    Cidr(String),
    #[error("subnet {subnet}: VPC {vpc} is not declared")]
    UnknownVpc { subnet: String, vpc: String },
    #[error("unknown subnet {0}")]
    UnknownSubnet(String),
    #[error("duplicate name {0}")]
    Duplicate(String),
    #[error("subnet {0}: an unmanaged subnet must be /29 or wider")]
    UnmanagedTooSmall(String),
    #[error("NIC of {vm}: {ip} is not inside subnet {subnet}")]
    IpOutsideSubnet {
        vm: String,
        ip: Ipv4Addr,
        subnet: String,
    },
    #[error("NIC of {vm}: address {ip} is already taken")]
    IpTaken { vm: String, ip: Ipv4Addr },
    #[error("NIC of {vm}: MAC {mac} is already attached")]
    MacTaken { vm: String, mac: String },
    #[error("NIC of {vm}: MAC {mac} is multicast or zero")]
    BadMac { vm: String, mac: String },
    #[error("no subnet contains {0}")]
    NoSubnetFor(Ipv4Addr),
    #[error("network thread is gone")]
    Stopped,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_math() {
        let c: Ipv4Cidr = "10.1.2.77/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 1, 2, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(c.first_host(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(c.last_host(), Ipv4Addr::new(10, 1, 2, 254));
        assert!(c.contains(Ipv4Addr::new(10, 1, 2, 9)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 3, 9)));
        assert!("10.0.0.0/31".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Cidr>().is_err());
    }
}
