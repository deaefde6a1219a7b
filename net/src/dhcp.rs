//! The DHCP server of a managed subnet: dynamic leases from the subnet's pool, fixed leases for
//! NICs with an `ip`, router = the gateway, DNS = the subnet's `dns` servers (else the
//! gateway), hostname = the VM's name.
//!
//! It is a pure state machine over DHCP payloads (no sockets), so it is tested with captured
//! client messages.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::{DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress};

use crate::config::Ipv4Cidr;

pub(crate) const SERVER_PORT: u16 = 67;
pub(crate) const CLIENT_PORT: u16 = 68;
/// DNS servers sent in option 6.
const MAX_DNS: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DhcpError {
    #[error("malformed DHCP message: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone)]
struct Lease {
    ip: Ipv4Addr,
    expires: Instant,
}

/// What the server answers one client message with.
#[derive(Debug)]
pub struct DhcpReply {
    /// The DHCP payload to send to the client (UDP 67 -> 68, broadcast).
    pub payload: Vec<u8>,
    /// Set on an ACK: the client now holds this address.
    pub bound: Option<Ipv4Addr>,
}

pub struct DhcpServer {
    cidr: Ipv4Cidr,
    server_ip: Ipv4Addr,
    lease_time: Duration,
    /// Option 6: what guests use as their DNS servers.
    dns: Vec<Ipv4Addr>,
    fixed: HashMap<[u8; 6], Ipv4Addr>,
    hostnames: HashMap<[u8; 6], String>,
    leases: HashMap<[u8; 6], Lease>,
}

impl DhcpServer {
    pub fn new(cidr: Ipv4Cidr, server_ip: Ipv4Addr, lease_time: Duration) -> Self {
        DhcpServer {
            cidr,
            server_ip,
            lease_time,
            dns: vec![server_ip],
            fixed: HashMap::new(),
            hostnames: HashMap::new(),
            leases: HashMap::new(),
        }
    }

    /// DNS servers to hand out instead of the gateway (the subnet's `dns`); at most 8 are
    /// sent, the rest would not fit a resolver's list anyway. Empty keeps the gateway.
    pub fn with_dns(mut self, dns: &[Ipv4Addr]) -> Self {
        if !dns.is_empty() {
            self.dns = dns.iter().take(MAX_DNS).copied().collect();
        }
        self
    }

    /// The DNS servers guests are told to use.
    pub fn dns(&self) -> &[Ipv4Addr] {
        &self.dns
    }

    /// Register a NIC: its hostname and, for NICs with an `ip`, its fixed address.
    pub fn add_client(&mut self, mac: [u8; 6], hostname: &str, fixed: Option<Ipv4Addr>) {
        self.hostnames.insert(mac, hostname.to_string());
        if let Some(ip) = fixed {
            self.fixed.insert(mac, ip);
        }
    }

    /// Bind a lease for `mac` now, without a DHCP exchange: kiln hands a build VM its address
    /// through its agent before the guest's own DHCP client runs, and that client's later
    /// DISCOVER/REQUEST gets the same address. `None` when the pool is exhausted.
    pub fn bind(&mut self, mac: [u8; 6], now: Instant) -> Option<Ipv4Addr> {
        let ip = self.pick(&mac, None, now)?;
        self.leases.insert(
            mac,
            Lease {
                ip,
                expires: now + self.lease_time,
            },
        );
        Some(ip)
    }

    /// How long a lease lasts.
    pub fn lease_time(&self) -> Duration {
        self.lease_time
    }

    fn taken_by_other(&self, mac: &[u8; 6], ip: Ipv4Addr, now: Instant) -> bool {
        self.fixed.iter().any(|(m, f)| m != mac && *f == ip)
            || self
                .leases
                .iter()
                .any(|(m, l)| m != mac && l.ip == ip && l.expires > now)
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip)
            && ip != self.server_ip
            && ip != self.cidr.network()
            && ip != self.cidr.broadcast()
    }

    /// The address for `mac`: its fixed one, its current lease, the one it asks for, or the
    /// first free one.
    fn pick(&self, mac: &[u8; 6], requested: Option<Ipv4Addr>, now: Instant) -> Option<Ipv4Addr> {
        if let Some(ip) = self.fixed.get(mac) {
            return Some(*ip);
        }
        if let Some(l) = self.leases.get(mac) {
            if !self.taken_by_other(mac, l.ip, now) {
                return Some(l.ip);
            }
        }
        if let Some(ip) = requested {
            if self.in_pool(ip) && !self.taken_by_other(mac, ip, now) {
                return Some(ip);
            }
        }
        let first = u32::from(self.cidr.first_host());
        let last = u32::from(self.cidr.last_host());
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| self.in_pool(*ip) && !self.taken_by_other(mac, *ip, now))
    }

    /// Answer one DHCP message `payload` sent by the NIC with MAC `src_mac`.
    pub fn handle(
        &mut self,
        src_mac: [u8; 6],
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<DhcpReply>, DhcpError> {
        let packet =
            DhcpPacket::new_checked(payload).map_err(|e| DhcpError::Malformed(e.to_string()))?;
        let req = DhcpRepr::parse(&packet).map_err(|e| DhcpError::Malformed(e.to_string()))?;
        let mac = req.client_hardware_address.0;
        if mac != src_mac {
            // A guest asking on behalf of another MAC: not something kiln's NICs do.
            return Ok(None);
        }
        if let Some(sid) = req.server_identifier {
            if sid != self.server_ip && req.message_type == DhcpMessageType::Request {
                // The client chose another server; forget any offer.
                return Ok(None);
            }
        }
        match req.message_type {
            DhcpMessageType::Discover => {
                let Some(ip) = self.pick(&mac, req.requested_ip, now) else {
                    tracing::warn!("DHCP pool of {} exhausted", self.cidr);
                    return Ok(None);
                };
                Ok(Some(DhcpReply {
                    payload: self.reply(&req, DhcpMessageType::Offer, ip),
                    bound: None,
                }))
            }
            DhcpMessageType::Request => {
                let wanted = req.requested_ip.or(if req.client_ip.is_unspecified() {
                    None
                } else {
                    Some(req.client_ip)
                });
                let ip = self.pick(&mac, wanted, now);
                match (ip, wanted) {
                    (Some(ip), Some(w)) if ip == w => {
                        self.leases.insert(
                            mac,
                            Lease {
                                ip,
                                expires: now + self.lease_time,
                            },
                        );
                        Ok(Some(DhcpReply {
                            payload: self.reply(&req, DhcpMessageType::Ack, ip),
                            bound: Some(ip),
                        }))
                    }
                    _ => Ok(Some(DhcpReply {
                        payload: self.reply(&req, DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED),
                        bound: None,
                    })),
                }
            }
            DhcpMessageType::Release | DhcpMessageType::Decline => {
                self.leases.remove(&mac);
                Ok(None)
            }
            DhcpMessageType::Inform => Ok(Some(DhcpReply {
                payload: self.reply(&req, DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED),
                bound: None,
            })),
            _ => Ok(None),
        }
    }

    fn reply(&self, req: &DhcpRepr, kind: DhcpMessageType, ip: Ipv4Addr) -> Vec<u8> {
        let nak = kind == DhcpMessageType::Nak;
        let dns: Vec<u8> = self.dns.iter().flat_map(|a| a.octets()).collect();
        let host = self
            .hostnames
            .get(&req.client_hardware_address.0)
            .cloned()
            .unwrap_or_default();
        let mut extra = vec![DhcpOption {
            kind: 6,
            data: &dns,
        }];
        if !host.is_empty() {
            extra.push(DhcpOption {
                kind: 12,
                data: host.as_bytes(),
            });
        }
        let lease = self.lease_time.as_secs().min(u32::MAX as u64) as u32;
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip: req.client_ip,
            your_ip: ip,
            server_ip: self.server_ip,
            router: (!nak).then_some(self.server_ip),
            subnet_mask: (!nak).then_some(self.cidr.netmask()),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: req.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.server_ip),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: (!nak && !ip.is_unspecified()).then_some(lease),
            renew_duration: (!nak && !ip.is_unspecified()).then_some(lease / 2),
            rebind_duration: (!nak && !ip.is_unspecified()).then_some(lease / 8 * 7),
            additional_options: if nak { &[] } else { &extra },
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        // The buffer is sized by the repr itself, so emitting cannot run out of room.
        if repr
            .emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .is_err()
        {
            buf.clear();
        }
        buf
    }
}

/// A DHCP client message, for tests (and the fuzz corpus).
#[doc(hidden)]
pub fn client_message(
    kind: DhcpMessageType,
    mac: [u8; 6],
    xid: u32,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: xid,
        secs: 0,
        client_hardware_address: EthernetAddress(mac),
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: true,
        requested_ip: requested,
        client_identifier: Some(EthernetAddress(mac)),
        server_identifier: server,
        parameter_request_list: Some(&[1, 3, 6, 12, 15, 51]),
        dns_servers: None,
        max_size: Some(1500),
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    let _ = repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]));
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn server() -> DhcpServer {
        let cidr: Ipv4Cidr = "10.9.0.0/24".parse().unwrap();
        let mut s = DhcpServer::new(cidr, Ipv4Addr::new(10, 9, 0, 1), Duration::from_secs(600));
        s.add_client(A, "alpha", None);
        s.add_client(B, "beta", Some(Ipv4Addr::new(10, 9, 0, 50)));
        s
    }

    struct Parsed {
        message_type: DhcpMessageType,
        transaction_id: u32,
        your_ip: Ipv4Addr,
        router: Option<Ipv4Addr>,
        subnet_mask: Option<Ipv4Addr>,
        lease_duration: Option<u32>,
    }

    fn parse(p: &[u8]) -> Parsed {
        let pkt = DhcpPacket::new_checked(p).unwrap();
        let r = DhcpRepr::parse(&pkt).unwrap();
        Parsed {
            message_type: r.message_type,
            transaction_id: r.transaction_id,
            your_ip: r.your_ip,
            router: r.router,
            subnet_mask: r.subnet_mask,
            lease_duration: r.lease_duration,
        }
    }

    fn option(p: &[u8], kind: u8) -> Option<Vec<u8>> {
        let pkt = DhcpPacket::new_checked(p).unwrap();
        let v = pkt
            .options()
            .find(|o| o.kind == kind)
            .map(|o| o.data.to_vec());
        v
    }

    #[test]
    fn discover_request_ack_gives_dynamic_lease_with_options() {
        let mut s = server();
        let now = Instant::now();
        let offer = s
            .handle(
                A,
                &client_message(DhcpMessageType::Discover, A, 7, None, None),
                now,
            )
            .unwrap()
            .unwrap();
        let o = parse(&offer.payload);
        assert_eq!(o.message_type, DhcpMessageType::Offer);
        assert_eq!(o.transaction_id, 7);
        assert_eq!(o.your_ip, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(o.router, Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(o.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(o.lease_duration, Some(600));
        assert_eq!(option(&offer.payload, 12), Some(b"alpha".to_vec()));
        assert_eq!(option(&offer.payload, 6), Some(vec![10, 9, 0, 1]));
        assert!(offer.bound.is_none());

        let req = client_message(
            DhcpMessageType::Request,
            A,
            8,
            Some(o.your_ip),
            Some(Ipv4Addr::new(10, 9, 0, 1)),
        );
        let ack = s.handle(A, &req, now).unwrap().unwrap();
        assert_eq!(parse(&ack.payload).message_type, DhcpMessageType::Ack);
        assert_eq!(ack.bound, Some(Ipv4Addr::new(10, 9, 0, 2)));
    }

    #[test]
    fn fixed_lease_and_conflicts() {
        let mut s = server();
        let now = Instant::now();
        let offer = s
            .handle(
                B,
                &client_message(DhcpMessageType::Discover, B, 1, None, None),
                now,
            )
            .unwrap()
            .unwrap();
        assert_eq!(parse(&offer.payload).your_ip, Ipv4Addr::new(10, 9, 0, 50));
        // A asking for B's fixed address gets a NAK.
        let req = client_message(
            DhcpMessageType::Request,
            A,
            2,
            Some(Ipv4Addr::new(10, 9, 0, 50)),
            None,
        );
        let nak = s.handle(A, &req, now).unwrap().unwrap();
        assert_eq!(parse(&nak.payload).message_type, DhcpMessageType::Nak);
        assert!(nak.bound.is_none());
    }

    #[test]
    fn spoofed_and_malformed_messages() {
        let mut s = server();
        let now = Instant::now();
        // chaddr differs from the frame's source MAC: ignored.
        let m = client_message(DhcpMessageType::Discover, A, 1, None, None);
        assert!(s.handle(B, &m, now).unwrap().is_none());
        assert!(s.handle(A, &m[..20], now).is_err());
        assert!(s.handle(A, &[], now).is_err());
    }

    #[test]
    fn leases_expire_and_pool_exhausts() {
        let cidr: Ipv4Cidr = "10.9.0.0/30".parse().unwrap();
        let mut s = DhcpServer::new(cidr, Ipv4Addr::new(10, 9, 0, 1), Duration::from_secs(10));
        let now = Instant::now();
        let req = client_message(
            DhcpMessageType::Request,
            A,
            1,
            Some(Ipv4Addr::new(10, 9, 0, 2)),
            None,
        );
        assert!(s.handle(A, &req, now).unwrap().unwrap().bound.is_some());
        // The only address is leased to A: B gets no offer until the lease runs out.
        let d = client_message(DhcpMessageType::Discover, B, 2, None, None);
        assert!(s.handle(B, &d, now).unwrap().is_none());
        let later = now + Duration::from_secs(11);
        let o = s.handle(B, &d, later).unwrap().unwrap();
        assert_eq!(parse(&o.payload).your_ip, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn option_6_names_the_subnets_dns_servers_else_the_gateway() {
        let d = client_message(DhcpMessageType::Discover, A, 7, None, None);
        let now = Instant::now();
        let offer = server().handle(A, &d, now).unwrap().unwrap();
        assert_eq!(option(&offer.payload, 6), Some(vec![10, 9, 0, 1]));

        let cidr: Ipv4Cidr = "10.9.0.0/24".parse().unwrap();
        let mut s = DhcpServer::new(cidr, Ipv4Addr::new(10, 9, 0, 1), Duration::from_secs(60))
            .with_dns(&[
                Ipv4Addr::new(192, 0, 2, 53),
                Ipv4Addr::new(198, 51, 100, 53),
            ]);
        s.add_client(A, "alpha", None);
        let offer = s.handle(A, &d, now).unwrap().unwrap();
        assert_eq!(
            option(&offer.payload, 6),
            Some(vec![192, 0, 2, 53, 198, 51, 100, 53])
        );
        let r = client_message(
            DhcpMessageType::Request,
            A,
            8,
            Some(parse(&offer.payload).your_ip),
            Some(Ipv4Addr::new(10, 9, 0, 1)),
        );
        let ack = s.handle(A, &r, now).unwrap().unwrap();
        assert_eq!(parse(&ack.payload).message_type, DhcpMessageType::Ack);
        assert_eq!(
            option(&ack.payload, 6),
            Some(vec![192, 0, 2, 53, 198, 51, 100, 53])
        );
        assert_eq!(
            s.dns(),
            [
                Ipv4Addr::new(192, 0, 2, 53),
                Ipv4Addr::new(198, 51, 100, 53)
            ]
        );
    }
}
