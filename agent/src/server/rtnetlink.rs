//! The three rtnetlink requests `NetConfig` needs (link up, add an address, add a default
//! route), written by hand: they are fixed-layout messages of a few dozen bytes, and a general
//! netlink crate would bring a whole message model into the static agent for them.
//! Layouts and numbers are those of `linux/netlink.h`, `linux/rtnetlink.h` and
//! `linux/if_addr.h`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_CACHEINFO: u16 = 6;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;

const RT_TABLE_MAIN: u8 = 254;
/// The route's origin as a DHCP client marks it, so systemd-networkd's
/// `KeepConfiguration=dhcp` keeps it (see `netconfig`).
const RTPROT_DHCP: u8 = 16;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// The metric systemd-networkd gives DHCP default routes, so its own route later replaces
/// this one instead of sitting beside it.
pub const DHCP_ROUTE_METRIC: u32 = 1024;

const AF_INET: u8 = libc::AF_INET as u8;

/// One netlink message under construction.
struct Msg(Vec<u8>);

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, header: &[u8]) -> Msg {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        v.extend_from_slice(header);
        pad(&mut v);
        Msg(v)
    }

    fn attr(mut self, ty: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len() as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        pad(&mut self.0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// `RTM_NEWLINK` setting `IFF_UP` on `ifindex`.
pub fn link_up(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    h.extend_from_slice(&0u16.to_ne_bytes()); // device type
    h.extend_from_slice(&ifindex.to_ne_bytes());
    h.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // flags
    h.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // change mask
    Msg::new(RTM_NEWLINK, 0, seq, &h).finish()
}

/// `RTM_NEWADDR`: `address/prefix` on `ifindex` with a finite lifetime of `lease_secs` (a
/// dynamic address, as a DHCP client adds it).
pub fn add_address(
    seq: u32,
    ifindex: u32,
    address: Ipv4Addr,
    prefix: u8,
    lease_secs: u32,
) -> Vec<u8> {
    let mut h = vec![AF_INET, prefix, 0, RT_SCOPE_UNIVERSE];
    h.extend_from_slice(&ifindex.to_ne_bytes());
    let mut cache = Vec::with_capacity(16);
    for v in [lease_secs, lease_secs, 0, 0] {
        cache.extend_from_slice(&v.to_ne_bytes());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    let broadcast = Ipv4Addr::from(u32::from(address) | !mask);
    Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq, &h)
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .attr(IFA_BROADCAST, &broadcast.octets())
        .attr(IFA_CACHEINFO, &cache)
        .finish()
}

/// `RTM_NEWROUTE`: the default route through `gateway` on `ifindex`, from `source`; marked as
/// DHCP's, or as a static route (`proto static`) for a static address.
pub fn add_default_route(
    seq: u32,
    ifindex: u32,
    gateway: Ipv4Addr,
    source: Ipv4Addr,
    static_route: bool,
) -> Vec<u8> {
    let h = [
        AF_INET,
        0, // destination prefix length: the default route
        0,
        0,
        RT_TABLE_MAIN,
        if static_route {
            RTPROT_STATIC
        } else {
            RTPROT_DHCP
        },
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &h)
        .attr(RTA_DST, &[0, 0, 0, 0])
        .attr(RTA_GATEWAY, &gateway.octets())
        .attr(RTA_OIF, &ifindex.to_ne_bytes())
        .attr(RTA_PRIORITY, &DHCP_ROUTE_METRIC.to_ne_bytes())
        .attr(RTA_PREFSRC, &source.octets())
        .finish()
}

/// A route netlink socket bound to the kernel.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 1 })
    }

    /// The next sequence number for a request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request built with sequence number `seq` and waits for the kernel's
    /// acknowledgement: `Ok` or the errno it reported.
    pub fn request(&mut self, seq: u32, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(r) = ack_for(&buf[..n as usize], seq) {
                return r;
            }
        }
    }
}

/// The acknowledgement for `seq` in a datagram of netlink messages, if it holds one.
fn ack_for(mut data: &[u8], seq: u32) -> Option<io::Result<()>> {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
        if len < 16 || len > data.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink message of {len} bytes in a datagram of {}",
                    data.len()
                ),
            )));
        }
        let ty = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        let mseq = u32::from_ne_bytes(data[8..12].try_into().ok()?);
        if ty == NLMSG_ERROR && mseq == seq && len >= 20 {
            let err = i32::from_ne_bytes(data[16..20].try_into().ok()?);
            return Some(if err == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-err))
            });
        }
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// The attributes after a fixed header of `hdr` bytes: (type, payload).
    fn attrs(b: &[u8], hdr: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 16 + hdr;
        while at < b.len() {
            let len = u16_at(b, at) as usize;
            out.push((u16_at(b, at + 2), b[at + 4..at + len].to_vec()));
            at += (len + 3) & !3;
        }
        out
    }

    #[test]
    fn address_message_layout() {
        let m = add_address(7, 3, Ipv4Addr::new(10, 0, 2, 15), 24, 3600);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWADDR);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(&m[16..20], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32_at(&m, 20), 3);
        let a = attrs(&m, 8);
        assert_eq!(a[0], (IFA_LOCAL, vec![10, 0, 2, 15]));
        assert_eq!(a[1], (IFA_ADDRESS, vec![10, 0, 2, 15]));
        assert_eq!(a[2], (IFA_BROADCAST, vec![10, 0, 2, 255]));
        assert_eq!(a[3].0, IFA_CACHEINFO);
        assert_eq!(u32_at(&a[3].1, 0), 3600);
        assert_eq!(u32_at(&a[3].1, 4), 3600);
    }

    #[test]
    fn route_and_link_message_layout() {
        let m = add_default_route(
            9,
            4,
            Ipv4Addr::new(10, 0, 2, 1),
            Ipv4Addr::new(10, 0, 2, 15),
            false,
        );
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWROUTE);
        assert_eq!(m[16 + 5], RTPROT_DHCP);
        assert_eq!(m[16 + 4], RT_TABLE_MAIN);
        let a = attrs(&m, 12);
        assert!(a.contains(&(RTA_GATEWAY, vec![10, 0, 2, 1])));
        assert!(a.contains(&(RTA_OIF, 4u32.to_ne_bytes().to_vec())));
        assert!(a.contains(&(RTA_PRIORITY, 1024u32.to_ne_bytes().to_vec())));
        assert!(a.contains(&(RTA_PREFSRC, vec![10, 0, 2, 15])));
        let s = add_default_route(
            9,
            4,
            Ipv4Addr::new(10, 0, 2, 1),
            Ipv4Addr::new(10, 0, 2, 15),
            true,
        );
        assert_eq!(s[16 + 5], RTPROT_STATIC);
        let l = link_up(2, 5);
        assert_eq!(u16_at(&l, 4), RTM_NEWLINK);
        assert_eq!(u32_at(&l, 20), 5);
        assert_eq!(u32_at(&l, 24), libc::IFF_UP as u32);
        assert_eq!(u32_at(&l, 28), libc::IFF_UP as u32);
    }

    #[test]
    fn acks_are_matched_by_sequence_and_bad_lengths_refused() {
        let ack = |seq: u32, err: i32| {
            let mut v = Vec::new();
            v.extend_from_slice(&36u32.to_ne_bytes());
            v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            v.extend_from_slice(&0u16.to_ne_bytes());
            v.extend_from_slice(&seq.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&err.to_ne_bytes());
            v.extend_from_slice(&[0u8; 16]);
            v
        };
        let mut two = ack(1, -libc::EEXIST);
        two.extend(ack(2, 0));
        assert!(matches!(ack_for(&two, 2), Some(Ok(()))));
        let e = ack_for(&two, 1).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(ack_for(&two, 3).is_none());
        let mut bad = ack(1, 0);
        bad[0..4].copy_from_slice(&999u32.to_ne_bytes());
        assert!(matches!(ack_for(&bad, 1), Some(Err(_))));
        assert!(ack_for(&[1, 2, 3], 1).is_none());
    }
}
