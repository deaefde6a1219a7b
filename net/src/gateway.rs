//! The gateway of one subnet: ARP for its address, DHCP, DNS, and the NAT that carries guest
//! flows to host sockets.
//!
//! TCP is terminated in smoltcp (fed bare IP packets, `Medium::Ip`; the gateway does ARP
//! itself) with `any_ip` on, so a guest's connection to `D:p` is accepted by a smoltcp socket
//! listening on `D:p` and relayed to a host socket connected to `D:p`. The guest's SYN is held
//! until the host connect finishes, so a refused host connect is a refused guest connect.
//! UDP is relayed datagram by datagram on connected host sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, HardwareAddress, Icmpv4DstUnreachable, Icmpv4Packet,
    Icmpv4Repr, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, UdpPacket,
};

use crate::config::Ipv4Cidr;
use crate::dhcp::{self, DhcpServer};
use crate::dns;
use crate::frame::{self, BROADCAST};
use crate::host_local::{self, HostDest};
use crate::icmp_nat::IcmpNat;

/// Buffer of each direction of a terminated TCP flow: bounds memory per flow.
const TCP_BUF: usize = 128 * 1024;
const UDP_IDLE: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DNS_PENDING: usize = 64;
const MAX_ARP: usize = 4096;

/// What the switch tells a gateway about its VPC when it hands it a frame.
pub(crate) struct VpcView<'a> {
    pub internet: bool,
    /// Guests may reach the host's own addresses through the NAT (loopback excepted).
    pub host_access: bool,
    pub names: &'a HashMap<String, Ipv4Addr>,
    pub alias: Option<Ipv4Addr>,
    /// Services on the gateway's own address (`httpDirectory`): port -> host address.
    pub services: &'a HashMap<u16, SocketAddr>,
}

/// smoltcp's view of the gateway: queues of bare IPv4 packets.
#[derive(Default)]
struct IpQueue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for IpQueue {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;
    fn receive(
        &mut self,
        _t: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }
    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxTok(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

type FlowKey = (Ipv4Addr, u16, Ipv4Addr, u16);

struct TcpFlow {
    handle: SocketHandle,
    host: TcpStream,
    key: Option<FlowKey>,
    host_eof: bool,
    host_write_closed: bool,
    want_write: bool,
    closing: bool,
}

struct PendingConnect {
    key: FlowKey,
    sock: socket2::Socket,
    syn: Vec<u8>,
    deadline: Instant,
}

struct UdpFlow {
    key: FlowKey,
    sock: UdpSocket,
    last: Instant,
}

struct DnsRelay {
    sock: UdpSocket,
    guest: (Ipv4Addr, u16),
    deadline: Instant,
}

pub(crate) struct Gateway {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub cidr: Ipv4Cidr,
    pub arp: HashMap<Ipv4Addr, [u8; 6]>,
    pub dhcp: Option<DhcpServer>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: IpQueue,
    tcp: Vec<TcpFlow>,
    pending: Vec<PendingConnect>,
    udp: Vec<UdpFlow>,
    dns_pending: Vec<DnsRelay>,
    upstreams: Vec<SocketAddr>,
    max_flows: usize,
    max_flows_per_guest: usize,
    next_port: u16,
    epoch: Instant,
    /// Frames for this subnet's ports.
    pub out: Vec<Vec<u8>>,
    /// (address, lease) pairs bound by DHCP since the switch last looked.
    pub bound: Vec<([u8; 6], Ipv4Addr)>,
    /// Receive buffer for host UDP sockets, allocated when the first one exists.
    udp_buf: Vec<u8>,
    icmp: IcmpNat,
}

fn smol_now(epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(epoch.elapsed().as_micros() as i64)
}

impl Gateway {
    pub(crate) fn new(
        cidr: Ipv4Cidr,
        ip: Ipv4Addr,
        mac: [u8; 6],
        dhcp: Option<DhcpServer>,
        upstreams: Vec<SocketAddr>,
        max_flows: (usize, usize),
        seed: u64,
    ) -> Self {
        let epoch = Instant::now();
        let mut dev = IpQueue::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut dev, smol_now(epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), cidr.prefix));
        });
        // Accept packets for any destination routed through our own address: the NAT.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(ip);
        Gateway {
            ip,
            mac,
            cidr,
            arp: HashMap::new(),
            dhcp,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            tcp: Vec::new(),
            pending: Vec::new(),
            udp: Vec::new(),
            dns_pending: Vec::new(),
            upstreams,
            max_flows: max_flows.0,
            max_flows_per_guest: max_flows.1,
            next_port: 49152,
            epoch,
            out: Vec::new(),
            bound: Vec::new(),
            udp_buf: Vec::new(),
            icmp: IcmpNat::new((seed >> 16) as u16),
        }
    }

    pub(crate) fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        if self.cidr.contains(ip) && ip != self.ip && !ip.is_unspecified() {
            if self.arp.len() >= MAX_ARP && !self.arp.contains_key(&ip) {
                return;
            }
            self.arp.insert(ip, mac);
        }
    }

    pub(crate) fn mac_of(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.arp.get(&ip).copied()
    }

    /// Send a bare IPv4 packet to a host of this subnet, resolving its MAC (an ARP request
    /// goes out and the packet is dropped while the address is unknown; TCP retransmits).
    pub(crate) fn emit_ip(&mut self, packet: Vec<u8>) {
        let Some(dst) = Ipv4Packet::new_checked(&packet[..])
            .ok()
            .map(|p| p.dst_addr())
        else {
            return;
        };
        if dst == self.cidr.broadcast() || dst.is_broadcast() {
            self.out
                .push(frame::wrap_ipv4(self.mac, BROADCAST, &packet));
            return;
        }
        match self.arp.get(&dst) {
            Some(mac) => self.out.push(frame::wrap_ipv4(self.mac, *mac, &packet)),
            None if self.cidr.contains(dst) => {
                self.out.push(frame::arp_frame(
                    ArpOperation::Request,
                    self.mac,
                    self.ip,
                    BROADCAST,
                    [0; 6],
                    dst,
                ));
            }
            None => {}
        }
    }

    /// An ARP packet seen on the subnet.
    pub(crate) fn handle_arp(&mut self, src_mac: [u8; 6], payload: &[u8]) {
        let Ok(pkt) = ArpPacket::new_checked(payload) else {
            return;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&pkt)
        else {
            return;
        };
        if source_hardware_addr.0 != src_mac {
            return;
        }
        self.learn(source_protocol_addr, src_mac);
        if operation == ArpOperation::Request && target_protocol_addr == self.ip {
            self.out.push(frame::arp_frame(
                ArpOperation::Reply,
                self.mac,
                self.ip,
                src_mac,
                src_mac,
                source_protocol_addr,
            ));
        }
    }

    /// DHCP from a port (any IPv4 frame to UDP port 67).
    fn handle_dhcp(&mut self, src_mac: [u8; 6], payload: &[u8]) {
        let Some(server) = self.dhcp.as_mut() else {
            return;
        };
        match server.handle(src_mac, payload, Instant::now()) {
            Ok(Some(reply)) => {
                if let Some(ip) = reply.bound {
                    self.arp.insert(ip, src_mac);
                    self.bound.push((src_mac, ip));
                }
                let p = frame::udp_packet(
                    self.ip,
                    dhcp::SERVER_PORT,
                    Ipv4Addr::BROADCAST,
                    dhcp::CLIENT_PORT,
                    &reply.payload,
                );
                // To the client's MAC: it has no address to be reached at yet.
                self.out.push(frame::wrap_ipv4(self.mac, src_mac, &p));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("DHCP from {}: {e}", crate::config::fmt_mac(&src_mac)),
        }
    }

    /// An IPv4 packet addressed to the gateway's MAC (or broadcast) that the switch did not
    /// route to another subnet.
    pub(crate) fn handle_ipv4(
        &mut self,
        src_mac: [u8; 6],
        to_us: bool,
        packet: &[u8],
        vpc: &VpcView,
    ) {
        let Ok(pkt) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        let Ok(ip) = Ipv4Repr::parse(&pkt, &ChecksumCapabilities::default()) else {
            return;
        };
        let hl = pkt.header_len() as usize;
        let total = (pkt.total_len() as usize).min(packet.len());
        let packet = &packet[..total];
        let payload = &packet[hl..];
        if pkt.more_frags() || pkt.frag_offset() != 0 {
            // The gateway does not reassemble; guests use path-MTU-sized packets.
            return;
        }
        self.learn(ip.src_addr, src_mac);
        if ip.next_header == IpProtocol::Udp {
            if let Ok(u) = UdpPacket::new_checked(payload) {
                if u.dst_port() == dhcp::SERVER_PORT
                    && (ip.dst_addr.is_broadcast() || ip.dst_addr == self.ip)
                {
                    self.handle_dhcp(src_mac, u.payload());
                    return;
                }
            }
        }
        if !to_us || ip.dst_addr.is_broadcast() || ip.dst_addr.is_multicast() {
            return;
        }
        let src_ok = self.cidr.contains(ip.src_addr);
        if !src_ok {
            // Spoofed or misconfigured source: nothing could answer it.
            return;
        }
        if ip.dst_addr == self.ip {
            match ip.next_header {
                IpProtocol::Udp => {
                    if let Ok(u) = UdpPacket::new_checked(payload) {
                        if u.dst_port() == 53 {
                            self.handle_dns(&ip, u.src_port(), u.payload(), vpc);
                            return;
                        }
                    }
                }
                IpProtocol::Tcp => {
                    if let Ok(t) = TcpPacket::new_checked(payload) {
                        if let Some(target) = vpc.services.get(&t.dst_port()).copied() {
                            self.handle_tcp_nat(&ip, packet, payload, target, None);
                            return;
                        }
                    }
                }
                _ => {}
            }
            // ICMP echo and port forwards' replies: smoltcp.
            self.dev.rx.push_back(packet.to_vec());
            return;
        }
        // Outside the VPC.
        let aliased = Some(ip.dst_addr) == vpc.alias;
        let mapped = if aliased {
            Ipv4Addr::LOCALHOST
        } else {
            ip.dst_addr
        };
        // New flows are screened for the host's own addresses; the alias is the configured
        // way to the host's loopback, so it is not.
        let screen = (!aliased).then_some(vpc.host_access);
        // The host's own loopback (and other addresses that only mean something on the host)
        // is reachable only through the configured alias, never by naming it directly.
        let host_only = ip.dst_addr.is_loopback()
            || ip.dst_addr.is_unspecified()
            || ip.dst_addr.octets()[0] == 0;
        if !vpc.internet || host_only {
            self.refuse(&ip, packet, payload);
            return;
        }
        match ip.next_header {
            IpProtocol::Tcp => {
                let Ok(t) = TcpPacket::new_checked(payload) else {
                    return;
                };
                let target = SocketAddr::V4(SocketAddrV4::new(mapped, t.dst_port()));
                self.handle_tcp_nat(&ip, packet, payload, target, screen);
            }
            IpProtocol::Udp => {
                let Ok(u) = UdpPacket::new_checked(payload) else {
                    return;
                };
                let key = (ip.src_addr, u.src_port(), ip.dst_addr, u.dst_port());
                let target = SocketAddr::V4(SocketAddrV4::new(mapped, u.dst_port()));
                self.handle_udp_nat(key, target, u.payload(), (&ip, packet, payload), screen);
            }
            IpProtocol::Icmp => {
                let Ok(pkt) = Icmpv4Packet::new_checked(payload) else {
                    return;
                };
                if let Ok(Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) = Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default())
                {
                    if let Some(why) = screen.and_then(|host_access| {
                        host_local::refusal(ip.dst_addr, host_access, host_local::routes_to_host)
                    }) {
                        self.refuse_host(&ip, packet, payload, why);
                        return;
                    }
                    self.icmp
                        .request(ip.src_addr, ip.dst_addr, mapped, ident, seq_no, data);
                }
            }
            _ => {
                if let Some(p) =
                    frame::icmp_unreachable(self.ip, packet, Icmpv4DstUnreachable::ProtoUnreachable)
                {
                    self.emit_ip(p);
                }
            }
        }
    }

    /// No internet: say so at once (RST for TCP, ICMP unreachable otherwise).
    fn refuse(&mut self, ip: &Ipv4Repr, packet: &[u8], payload: &[u8]) {
        if ip.next_header == IpProtocol::Tcp {
            if let Ok(t) = TcpPacket::new_checked(payload) {
                if let Ok(repr) = TcpRepr::parse(
                    &t,
                    &IpAddress::Ipv4(ip.src_addr),
                    &IpAddress::Ipv4(ip.dst_addr),
                    &ChecksumCapabilities::ignored(),
                ) {
                    if let Some(rst) = frame::tcp_rst_for(ip, &repr) {
                        self.emit_ip(rst);
                    }
                }
            }
            return;
        }
        if let Some(p) =
            frame::icmp_unreachable(self.ip, packet, Icmpv4DstUnreachable::NetProhibited)
        {
            self.emit_ip(p);
        }
    }

    /// A new flow to one of the host's own addresses: refused like a closed port.
    fn refuse_host(&mut self, ip: &Ipv4Repr, packet: &[u8], payload: &[u8], why: HostDest) {
        // Debug, not warn: a guest scanning addresses must not flood the log.
        tracing::debug!(
            "gateway {}: NAT refused {} -> {}: {why} (the VPC has no hostAccess)",
            self.ip,
            ip.src_addr,
            ip.dst_addr
        );
        self.refuse(ip, packet, payload);
    }

    fn flow_count(&self) -> usize {
        self.tcp.len() + self.pending.len() + self.udp.len()
    }

    /// Whether a new flow from `guest` would go over a limit.
    fn over_limit(&self, guest: Ipv4Addr) -> bool {
        let of_guest = self
            .tcp
            .iter()
            .filter(|f| f.key.is_some_and(|k| k.0 == guest))
            .count()
            + self.pending.iter().filter(|p| p.key.0 == guest).count()
            + self.udp.iter().filter(|u| u.key.0 == guest).count();
        self.flow_count() >= self.max_flows || of_guest >= self.max_flows_per_guest
    }

    /// `screen`: check a new flow against the host's own addresses (with the VPC's
    /// `host_access`); `None` for the gateway's services and the loopback alias.
    fn handle_tcp_nat(
        &mut self,
        ip: &Ipv4Repr,
        packet: &[u8],
        payload: &[u8],
        target: SocketAddr,
        screen: Option<bool>,
    ) {
        let Ok(t) = TcpPacket::new_checked(payload) else {
            return;
        };
        let Ok(repr) = TcpRepr::parse(
            &t,
            &IpAddress::Ipv4(ip.src_addr),
            &IpAddress::Ipv4(ip.dst_addr),
            &ChecksumCapabilities::default(),
        ) else {
            return;
        };
        let key = (ip.src_addr, repr.src_port, ip.dst_addr, repr.dst_port);
        if self.tcp.iter().any(|f| f.key == Some(key)) {
            self.dev.rx.push_back(packet.to_vec());
            return;
        }
        if self.pending.iter().any(|p| p.key == key) {
            // A retransmitted SYN while the host connect is under way.
            return;
        }
        if repr.control != TcpControl::Syn || repr.ack_number.is_some() {
            if let Some(rst) = frame::tcp_rst_for(ip, &repr) {
                self.emit_ip(rst);
            }
            return;
        }
        if let Some(why) = screen.and_then(|host_access| {
            host_local::refusal(ip.dst_addr, host_access, host_local::routes_to_host)
        }) {
            self.refuse_host(ip, packet, payload, why);
            return;
        }
        if self.over_limit(ip.src_addr) {
            // Debug, not warn: a guest opening flows in a loop must not flood the log.
            tracing::debug!(
                "gateway {}: flow limit reached for {}, refusing {}:{}",
                self.ip,
                ip.src_addr,
                ip.dst_addr,
                repr.dst_port
            );
            if let Some(rst) = frame::tcp_rst_for(ip, &repr) {
                self.emit_ip(rst);
            }
            return;
        }
        match start_connect(target) {
            Ok(sock) => self.pending.push(PendingConnect {
                key,
                sock,
                syn: packet.to_vec(),
                deadline: Instant::now() + CONNECT_TIMEOUT,
            }),
            Err(e) => {
                tracing::debug!("NAT connect to {target}: {e}");
                if let Some(rst) = frame::tcp_rst_for(ip, &repr) {
                    self.emit_ip(rst);
                }
            }
        }
    }

    /// `pkt`: the guest's IP header, packet and IP payload (for refusals); `screen` as for
    /// [`Self::handle_tcp_nat`].
    fn handle_udp_nat(
        &mut self,
        key: FlowKey,
        target: SocketAddr,
        data: &[u8],
        pkt: (&Ipv4Repr, &[u8], &[u8]),
        screen: Option<bool>,
    ) {
        let (ip, packet, payload) = pkt;
        let now = Instant::now();
        if let Some(f) = self.udp.iter_mut().find(|f| f.key == key) {
            f.last = now;
            let _ = f.sock.send(data);
            return;
        }
        if self.over_limit(key.0) {
            return;
        }
        let sock = UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.connect(target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match sock {
            Ok(sock) => {
                // The flow's own connected socket tells whether the route is local.
                if let Some(why) = screen.and_then(|host_access| {
                    host_local::refusal(ip.dst_addr, host_access, |d| {
                        Ok(host_local::local_is(&sock, d))
                    })
                }) {
                    self.refuse_host(ip, packet, payload, why);
                    return;
                }
                let _ = sock.send(data);
                self.udp.push(UdpFlow {
                    key,
                    sock,
                    last: now,
                });
            }
            Err(e) => {
                tracing::debug!("NAT UDP to {target}: {e}");
                if let Some(p) =
                    frame::icmp_unreachable(self.ip, packet, Icmpv4DstUnreachable::HostUnreachable)
                {
                    self.emit_ip(p);
                }
            }
        }
    }

    fn handle_dns(&mut self, ip: &Ipv4Repr, sport: u16, msg: &[u8], vpc: &VpcView) {
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!("DNS from {}: {e}", ip.src_addr);
                return;
            }
        };
        let short = q.name.strip_suffix(".kiln").unwrap_or(&q.name);
        let reply = if let Some(addr) = vpc.names.get(short) {
            Some(dns::name_reply(msg, &q, *addr, 60))
        } else if !q.name.contains('.') {
            Some(dns::error_reply(msg, &q, dns::RCODE_NXDOMAIN))
        } else if vpc.internet {
            match self.forward_dns(msg, (ip.src_addr, sport)) {
                Ok(()) => None,
                Err(e) => {
                    tracing::debug!("DNS forward: {e}");
                    Some(dns::error_reply(msg, &q, dns::RCODE_SERVFAIL))
                }
            }
        } else {
            Some(dns::error_reply(msg, &q, dns::RCODE_REFUSED))
        };
        if let Some(r) = reply {
            let p = frame::udp_packet(self.ip, 53, ip.src_addr, sport, &r);
            self.emit_ip(p);
        }
    }

    fn forward_dns(&mut self, msg: &[u8], guest: (Ipv4Addr, u16)) -> io::Result<()> {
        if self.dns_pending.len() >= MAX_DNS_PENDING {
            return Err(io::Error::other("too many DNS queries in flight"));
        }
        let upstream = if self.upstreams.is_empty() {
            dns::host_resolvers().into_iter().next()
        } else {
            self.upstreams.first().copied()
        }
        .ok_or_else(|| io::Error::other("no upstream resolver"))?;
        let bind = if upstream.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(bind)?;
        sock.connect(upstream)?;
        sock.set_nonblocking(true)?;
        sock.send(msg)?;
        self.dns_pending.push(DnsRelay {
            sock,
            guest,
            deadline: Instant::now() + DNS_TIMEOUT,
        });
        Ok(())
    }

    /// A host connection (port forward) to `guest:port` through this gateway.
    pub(crate) fn open_forward(&mut self, host: TcpStream, guest: Ipv4Addr, port: u16) {
        if self.tcp.len() >= self.max_flows {
            tracing::warn!(
                "gateway {}: flow limit reached, dropping a forward",
                self.ip
            );
            return;
        }
        let mut sock = new_tcp_socket();
        self.next_port = if self.next_port >= 65000 {
            49152
        } else {
            self.next_port + 1
        };
        let local = (IpAddress::Ipv4(self.ip), self.next_port);
        if let Err(e) = sock.connect(self.iface.context(), (IpAddress::Ipv4(guest), port), local) {
            tracing::warn!("forward to {guest}:{port}: {e}");
            return;
        }
        if host.set_nonblocking(true).is_err() {
            return;
        }
        let handle = self.sockets.add(sock);
        self.tcp.push(TcpFlow {
            handle,
            host,
            key: None,
            host_eof: false,
            host_write_closed: false,
            want_write: false,
            closing: false,
        });
    }

    /// Move data between smoltcp and the host sockets; send what smoltcp wants to send.
    /// Returns true when something moved (the switch then polls again without sleeping).
    pub(crate) fn service(&mut self) -> bool {
        let now = Instant::now();
        let mut progress = false;
        self.iface
            .poll(smol_now(self.epoch), &mut self.dev, &mut self.sockets);

        // Host connects that finished.
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let state = match p.sock.take_error() {
                Ok(Some(e)) | Err(e) => Err(e),
                Ok(None) => match p.sock.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
                    Err(e) => Err(e),
                },
            };
            let expired = now > p.deadline;
            match state {
                Ok(false) if !expired => {
                    i += 1;
                    continue;
                }
                Ok(true) => {
                    let p = self.pending.swap_remove(i);
                    progress = true;
                    let host: TcpStream = p.sock.into();
                    let _ = host.set_nodelay(true);
                    let mut sock = new_tcp_socket();
                    if sock.listen((IpAddress::Ipv4(p.key.2), p.key.3)).is_err() {
                        continue;
                    }
                    let handle = self.sockets.add(sock);
                    self.tcp.push(TcpFlow {
                        handle,
                        host,
                        key: Some(p.key),
                        host_eof: false,
                        host_write_closed: false,
                        want_write: false,
                        closing: false,
                    });
                    // Now the held SYN meets its listener.
                    self.dev.rx.push_back(p.syn);
                    self.iface
                        .poll(smol_now(self.epoch), &mut self.dev, &mut self.sockets);
                }
                _ => {
                    let p = self.pending.swap_remove(i);
                    progress = true;
                    self.refuse_syn(&p.syn);
                }
            }
        }

        // Relay established flows.
        let mut i = 0;
        while i < self.tcp.len() {
            let f = &mut self.tcp[i];
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            let mut failed = false;
            // Guest -> host.
            f.want_write = false;
            while sock.can_recv() {
                let r = sock.recv(|buf| match f.host.write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => progress = true,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        f.want_write = true;
                        break;
                    }
                    _ => {
                        failed = true;
                        break;
                    }
                }
            }
            let opening = matches!(
                sock.state(),
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent
            );
            // The guest closed its side: pass the FIN on to the host.
            if !opening && !sock.may_recv() && !sock.can_recv() && !f.host_write_closed {
                let _ = f.host.shutdown(Shutdown::Write);
                f.host_write_closed = true;
            }
            // Host -> guest.
            while !failed && !f.host_eof && sock.can_send() {
                let r = sock.send(|buf| match f.host.read(buf) {
                    Ok(0) => (0, Ok(0)),
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        f.host_eof = true;
                        progress = true;
                    }
                    Ok(Ok(_)) => progress = true,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    _ => failed = true,
                }
            }
            if f.host_eof && !f.closing {
                sock.close();
                f.closing = true;
            }
            if failed {
                sock.abort();
            }
            let state = sock.state();
            let done = state == tcp::State::Closed || state == tcp::State::TimeWait;
            if done {
                let f = self.tcp.swap_remove(i);
                self.sockets.remove(f.handle);
                progress = true;
                continue;
            }
            i += 1;
        }

        // UDP replies.
        let mut buf = std::mem::take(&mut self.udp_buf);
        if buf.is_empty() && (!self.udp.is_empty() || !self.dns_pending.is_empty()) {
            buf = vec![0u8; 65536];
        }
        let mut i = 0;
        while i < self.udp.len() {
            let mut got = Vec::new();
            for _ in 0..64 {
                match self.udp[i].sock.recv(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(_) => break,
                }
            }
            let key = self.udp[i].key;
            if !got.is_empty() {
                self.udp[i].last = now;
                progress = true;
            }
            for d in got {
                if d.len() > 1472 {
                    continue;
                }
                let p = frame::udp_packet(key.2, key.3, key.0, key.1, &d);
                self.emit_ip(p);
            }
            if now.duration_since(self.udp[i].last) > UDP_IDLE {
                self.udp.swap_remove(i);
                continue;
            }
            i += 1;
        }

        // Echo replies.
        for (from, guest, ident, seq, data) in self.icmp.replies() {
            progress = true;
            let p = crate::icmp_nat::echo_reply(from, guest, ident, seq, &data);
            self.emit_ip(p);
        }

        // DNS answers from upstream.
        let mut i = 0;
        while i < self.dns_pending.len() {
            match self.dns_pending[i].sock.recv(&mut buf) {
                Ok(n) => {
                    let r = self.dns_pending.swap_remove(i);
                    if n <= 1472 {
                        let p = frame::udp_packet(self.ip, 53, r.guest.0, r.guest.1, &buf[..n]);
                        self.emit_ip(p);
                    }
                    progress = true;
                    continue;
                }
                Err(_) if now > self.dns_pending[i].deadline => {
                    self.dns_pending.swap_remove(i);
                    continue;
                }
                Err(_) => i += 1,
            }
        }

        self.udp_buf = buf;
        self.iface
            .poll(smol_now(self.epoch), &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            progress = true;
            self.emit_ip(p);
        }
        progress
    }

    fn refuse_syn(&mut self, syn: &[u8]) {
        let Ok(pkt) = Ipv4Packet::new_checked(syn) else {
            return;
        };
        let Ok(ip) = Ipv4Repr::parse(&pkt, &ChecksumCapabilities::ignored()) else {
            return;
        };
        let payload = &syn[pkt.header_len() as usize..];
        self.refuse(&ip, syn, payload);
    }

    /// File descriptors to wait on, with their events.
    pub(crate) fn pollfds(&mut self, out: &mut Vec<libc::pollfd>) {
        let pf = |fd: RawFd, events: i16| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        for p in &self.pending {
            out.push(pf(p.sock.as_raw_fd(), libc::POLLOUT));
        }
        for f in &self.tcp {
            let sock = self.sockets.get::<tcp::Socket>(f.handle);
            let mut ev = 0;
            if !f.host_eof && sock.can_send() {
                ev |= libc::POLLIN;
            }
            if f.want_write {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                out.push(pf(f.host.as_raw_fd(), ev));
            }
        }
        for u in &self.udp {
            out.push(pf(u.sock.as_raw_fd(), libc::POLLIN));
        }
        for d in &self.dns_pending {
            out.push(pf(d.sock.as_raw_fd(), libc::POLLIN));
        }
        if let Some(fd) = self.icmp.fd() {
            out.push(pf(fd, libc::POLLIN));
        }
    }

    /// How long the switch may sleep before smoltcp has timers to run.
    pub(crate) fn poll_delay(&mut self) -> Option<Duration> {
        let d = self
            .iface
            .poll_delay(smol_now(self.epoch), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        if !self.pending.is_empty()
            || !self.udp.is_empty()
            || !self.dns_pending.is_empty()
            || self.icmp.busy()
        {
            // Deadlines and idle timeouts are checked on a coarse tick.
            return Some(d.map_or(Duration::from_millis(500), |d| {
                d.min(Duration::from_millis(500))
            }));
        }
        d
    }
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
    s
}

fn start_connect(target: SocketAddr) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock)
}
