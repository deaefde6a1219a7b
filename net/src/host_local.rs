//! Which NAT destinations are the host's own.
//!
//! The NAT opens host sockets for guests, so a guest naming one of the host's addresses would
//! reach services that listen on it (everything bound to 0.0.0.0, say). Such destinations are
//! refused unless the guest's VPC opts in (`VpcConfig::host_access`); loopback never opens.
//! "The host's own" is what the kernel routes to the host itself, asked per new flow with a
//! connected UDP socket (no packet is sent), so an address added while the network runs is
//! covered at once, whichever interface carries it.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};

/// Why the NAT refuses a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostDest {
    /// 127.0.0.0/8 and 0.0.0.0/8: meaningful on the host only; refused even with host access.
    Loopback,
    /// Broadcast and multicast: no flow to carry.
    Broadcast,
    /// 169.254.0.0/16: the host's own link (where clouds serve instance metadata).
    LinkLocal,
    /// Routed to the host itself: an address of one of its interfaces (or a local route).
    Local,
    /// The host has no route to it (or it is a broadcast address of a host network).
    NoRoute,
}

impl std::fmt::Display for HostDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostDest::Loopback => "the host's loopback",
            HostDest::Broadcast => "a broadcast or multicast address",
            HostDest::LinkLocal => "a link-local address of the host's network",
            HostDest::Local => "an address of the host",
            HostDest::NoRoute => "not routable from the host",
        })
    }
}

/// The NAT's verdict on a new flow to `dst`: `None` carries it, `Some` refuses it.
/// `is_local` asks the kernel (tests fake it); it is asked only when the answer matters.
pub(crate) fn refusal(
    dst: Ipv4Addr,
    host_access: bool,
    is_local: impl FnOnce(Ipv4Addr) -> io::Result<bool>,
) -> Option<HostDest> {
    if dst.is_loopback() || dst.octets()[0] == 0 {
        return Some(HostDest::Loopback);
    }
    if dst.is_broadcast() || dst.is_multicast() {
        return Some(HostDest::Broadcast);
    }
    if host_access {
        return None;
    }
    if dst.is_link_local() {
        return Some(HostDest::LinkLocal);
    }
    match is_local(dst) {
        Ok(false) => None,
        Ok(true) => Some(HostDest::Local),
        Err(e) => {
            tracing::trace!("route to {dst}: {e}");
            Some(HostDest::NoRoute)
        }
    }
}

/// Whether the kernel routes `dst` to this host: a UDP socket connected to an address of the
/// host gets that address itself as its source (the local route the kernel makes for every
/// interface address has it as its preferred source). Connecting a UDP socket sends nothing.
pub(crate) fn routes_to_host(dst: Ipv4Addr) -> io::Result<bool> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect((dst, 9))?;
    Ok(local_is(&s, dst))
}

/// Whether a connected socket's source address is `dst`, i.e. the route to `dst` is local.
pub(crate) fn local_is(s: &UdpSocket, dst: Ipv4Addr) -> bool {
    matches!(s.local_addr(), Ok(a) if a.ip() == std::net::IpAddr::V4(dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: Ipv4Addr) -> io::Result<bool> {
        panic!("the kernel was asked although the answer could not matter")
    }

    #[test]
    fn policy_refuses_the_hosts_addresses_unless_opted_in() {
        let lo = Ipv4Addr::new(127, 0, 0, 53);
        let zero = Ipv4Addr::new(0, 1, 2, 3);
        for host_access in [false, true] {
            assert_eq!(refusal(lo, host_access, never), Some(HostDest::Loopback));
            assert_eq!(
                refusal(Ipv4Addr::UNSPECIFIED, host_access, never),
                Some(HostDest::Loopback)
            );
            assert_eq!(refusal(zero, host_access, never), Some(HostDest::Loopback));
            assert_eq!(
                refusal(Ipv4Addr::BROADCAST, host_access, never),
                Some(HostDest::Broadcast)
            );
            assert_eq!(
                refusal(Ipv4Addr::new(224, 0, 0, 251), host_access, never),
                Some(HostDest::Broadcast)
            );
        }
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(refusal(metadata, false, never), Some(HostDest::LinkLocal));
        assert_eq!(refusal(metadata, true, never), None);

        let host = Ipv4Addr::new(192, 0, 2, 10);
        let outside = Ipv4Addr::new(198, 51, 100, 7);
        let kernel = |d: Ipv4Addr| Ok(d == host);
        assert_eq!(refusal(host, false, kernel), Some(HostDest::Local));
        assert_eq!(refusal(outside, false, kernel), None);
        assert_eq!(refusal(host, true, never), None);
        assert_eq!(
            refusal(outside, false, |_| Err(io::Error::from_raw_os_error(
                libc::ENETUNREACH
            ))),
            Some(HostDest::NoRoute)
        );
    }

    #[test]
    fn the_kernel_says_loopback_is_local() {
        // The one address every host has; nothing is sent. (127.9.8.7 is local too, but its
        // route's source is 127.0.0.1: the loopback block is refused by the rule above.)
        assert!(routes_to_host(Ipv4Addr::new(127, 0, 0, 1)).unwrap());
    }
}
