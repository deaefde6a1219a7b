//! The gateway's state machines driven with hand-built frames through a NIC port (no root
//! needed): DHCP, ARP, refusals without internet, the NAT's TCP handshake to a loopback
//! server, the flow limit, and isolation. The only host sockets touched are on 127.0.0.1,
//! except in the host-access test, which runs its networks inside a network namespace it made
//! (root; it prints `SKIP:` without), with the address on a TAP device there.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_net::dhcp::client_message;
use kiln_net::{FramePort, Network, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

fn network(internet: bool, max_flows: usize) -> Network {
    network_with(internet, max_flows, false)
}

fn network_with(internet: bool, max_flows: usize, host_access: bool) -> Network {
    Network::new(NetworkConfig {
        vpcs: vec![
            VpcConfig {
                name: "a".into(),
                internet,
                host_access,
            },
            VpcConfig {
                name: "b".into(),
                internet,
                host_access,
            },
        ],
        subnets: vec![
            SubnetConfig {
                name: "s1".into(),
                vpc: "a".into(),
                cidr: "10.1.0.0/24".parse().unwrap(),
                dhcp: true,
                unmanaged: false,
                dns: Vec::new(),
            },
            SubnetConfig {
                name: "s2".into(),
                vpc: "b".into(),
                cidr: "10.1.0.0/24".parse().unwrap(),
                dhcp: true,
                unmanaged: false,
                dns: Vec::new(),
            },
        ],
        host_loopback_alias: Some(ALIAS),
        max_flows_per_subnet: max_flows,
        ..NetworkConfig::default()
    })
    .unwrap()
}

fn attach(net: &Network, vm: &str, subnet: &str, mac: [u8; 6]) -> Arc<dyn FramePort> {
    net.attach(NicConfig {
        vm_name: vm.into(),
        subnet: subnet.into(),
        mac,
        fixed_ip: None,
    })
    .unwrap()
}

/// Wait for a frame on `port` that `want` accepts (others are skipped).
fn expect(
    port: &Arc<dyn FramePort>,
    within: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let end = Instant::now() + within;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < end {
        match port.recv(&mut buf).unwrap() {
            Some(n) if want(&buf[..n]) => return Some(buf[..n].to_vec()),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    None
}

fn eth(src: [u8; 6], dst: [u8; 6], et: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload.len()];
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: et,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    f[14..].copy_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, body: &[u8]) -> Vec<u8> {
    let r = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: body.len(),
        hop_limit: 64,
    };
    let mut p = vec![0u8; 20 + body.len()];
    r.emit(
        &mut Ipv4Packet::new_unchecked(&mut p[..]),
        &ChecksumCapabilities::default(),
    );
    p[20..].copy_from_slice(body);
    p
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 8 + data.len()];
    UdpRepr {
        src_port: sport,
        dst_port: dport,
    }
    .emit(
        &mut UdpPacket::new_unchecked(&mut b[..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        data.len(),
        |p| p.copy_from_slice(data),
        &ChecksumCapabilities::default(),
    );
    ipv4(src, dst, IpProtocol::Udp, &b)
}

// A test helper that mirrors the TCP header fields one to one.
#[allow(clippy::too_many_arguments)]
fn tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    ctl: TcpControl,
    seq: i32,
    ack: Option<i32>,
    data: &[u8],
) -> Vec<u8> {
    let r = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: ctl,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 64000,
        window_scale: None,
        max_seg_size: if ctl == TcpControl::Syn {
            Some(1460)
        } else {
            None
        },
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: data,
    };
    let mut b = vec![0u8; r.buffer_len()];
    r.emit(
        &mut TcpPacket::new_unchecked(&mut b[..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        &ChecksumCapabilities::default(),
    );
    ipv4(src, dst, IpProtocol::Tcp, &b)
}

fn gw_mac(port: &Arc<dyn FramePort>, mac: [u8; 6], ip: Ipv4Addr) -> [u8; 6] {
    let req = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GW,
    };
    let mut a = vec![0u8; req.buffer_len()];
    req.emit(&mut ArpPacket::new_unchecked(&mut a[..]));
    port.send(&eth(mac, [0xff; 6], EthernetProtocol::Arp, &a))
        .unwrap();
    let reply = expect(port, Duration::from_secs(2), |f| {
        f.get(12..14) == Some(&[0x08, 0x06][..])
    })
    .expect("ARP reply from the gateway");
    let p = ArpPacket::new_checked(&reply[14..]).unwrap();
    match ArpRepr::parse(&p).unwrap() {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_protocol_addr, GW);
            assert_eq!(target_protocol_addr, ip);
            source_hardware_addr.0
        }
        _ => panic!("not an ARP reply"),
    }
}

/// The IPv4 packet inside a frame, with its protocol.
fn ip_of(f: &[u8]) -> Option<(Ipv4Repr, Vec<u8>)> {
    if f.get(12..14) != Some(&[0x08, 0x00][..]) {
        return None;
    }
    let p = Ipv4Packet::new_checked(&f[14..]).ok()?;
    let r = Ipv4Repr::parse(&p, &ChecksumCapabilities::default()).ok()?;
    Some((r, p.payload().to_vec()))
}

fn tcp_of(
    f: &[u8],
) -> Option<(
    Ipv4Repr,
    TcpControl,
    Option<TcpSeqNumber>,
    TcpSeqNumber,
    u16,
)> {
    let (ip, body) = ip_of(f)?;
    if ip.next_header != IpProtocol::Tcp {
        return None;
    }
    let t = TcpPacket::new_checked(&body[..]).ok()?;
    let r = TcpRepr::parse(
        &t,
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        &ChecksumCapabilities::default(),
    )
    .ok()?;
    Some((ip, r.control, r.ack_number, r.seq_number, r.dst_port))
}

/// A DHCP client message from `mac`, broadcast as a client without an address sends it.
fn dhcp_frame(mac: [u8; 6], m: &[u8]) -> Vec<u8> {
    eth(
        mac,
        [0xff; 6],
        EthernetProtocol::Ipv4,
        &udp(Ipv4Addr::UNSPECIFIED, 68, Ipv4Addr::BROADCAST, 67, m),
    )
}

/// Whether `f` is a DHCP server's answer (UDP to port 68).
fn is_dhcp(f: &[u8]) -> bool {
    ip_of(f).is_some_and(|(ip, body)| {
        ip.next_header == IpProtocol::Udp && body.get(2..4) == Some(&[0, 68][..])
    })
}

#[test]
fn dhcp_lease_over_frames() {
    let net = network(false, 16);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let dhcp = |m: Vec<u8>| dhcp_frame(MAC_A, &m);
    port.send(&dhcp(client_message(
        DhcpMessageType::Discover,
        MAC_A,
        42,
        None,
        None,
    )))
    .unwrap();
    let offer = expect(&port, Duration::from_secs(2), is_dhcp).expect("offer");
    let (_, body) = ip_of(&offer).unwrap();
    let payload = &body[8..];
    let p = DhcpPacket::new_checked(payload).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Offer);
    assert_eq!(r.transaction_id, 42);
    assert_eq!(r.router, Some(GW));
    let ip = r.your_ip;
    assert!(ip != GW && ip.octets()[..3] == [10, 1, 0]);
    assert_eq!(
        p.options().find(|o| o.kind == 12).map(|o| o.data.to_vec()),
        Some(b"alpha".to_vec())
    );
    port.send(&dhcp(client_message(
        DhcpMessageType::Request,
        MAC_A,
        43,
        Some(ip),
        Some(GW),
    )))
    .unwrap();
    let ack = expect(&port, Duration::from_secs(2), is_dhcp).expect("ack");
    let (_, body) = ip_of(&ack).unwrap();
    let p = DhcpPacket::new_checked(&body[8..]).unwrap();
    assert_eq!(
        DhcpRepr::parse(&p).unwrap().message_type,
        DhcpMessageType::Ack
    );
    // The lease names the VM in the VPC's DNS.
    let end = Instant::now() + Duration::from_secs(2);
    while net.resolve("alpha").unwrap().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(net.resolve("alpha").unwrap(), vec![ip]);
}

/// A lease bound ahead (kiln hands the guest its address through the agent) names the VM at
/// once, and the guest's own DHCP exchange afterwards gets the very same address.
#[test]
fn lease_bound_ahead_is_what_dhcp_then_gives() {
    let net = network(false, 16);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let _other = attach(&net, "beta", "s1", MAC_B);
    assert_eq!(
        net.lease([2, 0, 0, 0, 0, 0xee]).unwrap(),
        None,
        "unknown NIC"
    );
    let lease = net.lease(MAC_A).unwrap().expect("a lease");
    assert_eq!(lease.gateway, GW);
    assert_eq!(lease.dns, vec![GW]);
    assert_eq!(lease.prefix, 24);
    assert!(lease.lease_time > Duration::ZERO);
    assert!(lease.address != GW && lease.address.octets()[..3] == [10, 1, 0]);
    assert_eq!(net.resolve("alpha").unwrap(), vec![lease.address]);
    // Binding again keeps the address; another NIC gets another one.
    assert_eq!(net.lease(MAC_A).unwrap().unwrap().address, lease.address);
    let b = net.lease(MAC_B).unwrap().unwrap().address;
    assert_ne!(b, lease.address);

    let dhcp = |m: Vec<u8>| dhcp_frame(MAC_A, &m);
    port.send(&dhcp(client_message(
        DhcpMessageType::Discover,
        MAC_A,
        7,
        None,
        None,
    )))
    .unwrap();
    let offer = expect(&port, Duration::from_secs(2), is_dhcp).expect("offer");
    let (_, body) = ip_of(&offer).unwrap();
    let p = DhcpPacket::new_checked(&body[8..]).unwrap();
    assert_eq!(DhcpRepr::parse(&p).unwrap().your_ip, lease.address);
    port.send(&dhcp(client_message(
        DhcpMessageType::Request,
        MAC_A,
        8,
        Some(lease.address),
        Some(GW),
    )))
    .unwrap();
    let ack = expect(&port, Duration::from_secs(2), is_dhcp).expect("ack");
    let (_, body) = ip_of(&ack).unwrap();
    let p = DhcpPacket::new_checked(&body[8..]).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Ack);
    assert_eq!(r.your_ip, lease.address);
}

#[test]
fn no_internet_refuses_at_once() {
    let net = network(false, 16);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let gw = gw_mac(&port, MAC_A, GUEST);
    // A documentation address (never contacted: without internet no host socket opens).
    let outside = Ipv4Addr::new(192, 0, 2, 7);
    port.send(&eth(
        MAC_A,
        gw,
        EthernetProtocol::Ipv4,
        &tcp(GUEST, 40000, outside, 80, TcpControl::Syn, 1000, None, &[]),
    ))
    .unwrap();
    let rst = expect(&port, Duration::from_secs(1), |f| tcp_of(f).is_some()).expect("RST");
    let (ip, ctl, ack, _, dport) = tcp_of(&rst).unwrap();
    assert_eq!(ctl, TcpControl::Rst);
    assert_eq!(ip.src_addr, outside);
    assert_eq!(dport, 40000);
    assert_eq!(ack, Some(TcpSeqNumber(1001)));

    port.send(&eth(
        MAC_A,
        gw,
        EthernetProtocol::Ipv4,
        &udp(GUEST, 5000, outside, 53, b"q"),
    ))
    .unwrap();
    let icmp = expect(&port, Duration::from_secs(1), |f| {
        ip_of(f).is_some_and(|(ip, _)| ip.next_header == IpProtocol::Icmp)
    })
    .expect("ICMP unreachable");
    let (_, body) = ip_of(&icmp).unwrap();
    let icmp = Icmpv4Packet::new_checked(&body[..]).unwrap();
    assert!(icmp.verify_checksum());
    // Type 3 (destination unreachable), code 9-13: administratively prohibited.
    assert_eq!(u8::from(icmp.msg_type()), 3);
    assert_eq!(
        &body[8 + 20 + 2..8 + 20 + 4],
        &[0, 53],
        "quotes the guest's UDP header"
    );
}

#[test]
fn nat_handshake_reaches_loopback_and_flows_are_bounded() {
    let net = network(true, 2);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let gw = gw_mac(&port, MAC_A, GUEST);
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, l) in listeners.iter().enumerate() {
        let p = l.local_addr().unwrap().port();
        port.send(&eth(
            MAC_A,
            gw,
            EthernetProtocol::Ipv4,
            &tcp(
                GUEST,
                41000 + i as u16,
                ALIAS,
                p,
                TcpControl::Syn,
                5000,
                None,
                &[],
            ),
        ))
        .unwrap();
        let reply = expect(&port, Duration::from_secs(3), |f| {
            tcp_of(f).is_some_and(|t| t.4 == 41000 + i as u16)
        })
        .expect("a reply to the SYN");
        let (ip, ctl, ack, _, _) = tcp_of(&reply).unwrap();
        assert_eq!(ip.src_addr, ALIAS);
        assert_eq!(ack, Some(TcpSeqNumber(5001)));
        if i < 2 {
            assert_eq!(ctl, TcpControl::Syn, "SYN-ACK for flow {i}");
        } else {
            assert_eq!(ctl, TcpControl::Rst, "the third flow is over the limit");
        }
    }
    // The first two reached the host's loopback listeners.
    for l in &listeners[..2] {
        l.set_nonblocking(true).unwrap();
        assert!(l.accept().is_ok(), "the NAT connected on the host");
    }
}

#[test]
fn vpcs_and_ports_are_isolated() {
    let net = network(true, 16);
    let a = attach(&net, "alpha", "s1", MAC_A);
    let b = attach(&net, "beta", "s2", MAC_B);
    let a2 = attach(&net, "alpha2", "s1", [2, 0, 0, 0, 0, 0xc]);
    // A broadcast in VPC a reaches a's other port, never VPC b.
    let frame = eth(
        MAC_A,
        [0xff; 6],
        EthernetProtocol::Ipv4,
        &udp(GUEST, 9, Ipv4Addr::new(10, 1, 0, 255), 9, b"hello"),
    );
    a.send(&frame).unwrap();
    assert!(expect(&a2, Duration::from_millis(500), |f| f == frame.as_slice()).is_some());
    assert!(
        expect(&b, Duration::from_millis(300), |_| true).is_none(),
        "frame crossed VPCs"
    );
    // Unicast to b's MAC from VPC a goes nowhere either.
    a.send(&eth(
        MAC_A,
        MAC_B,
        EthernetProtocol::Ipv4,
        &udp(GUEST, 9, GUEST, 9, b"x"),
    ))
    .unwrap();
    assert!(
        expect(&b, Duration::from_millis(300), |_| true).is_none(),
        "unicast crossed VPCs"
    );
    // A port cannot send as another MAC.
    a.send(&eth(
        [2, 0, 0, 0, 0, 0xc],
        [0xff; 6],
        EthernetProtocol::Ipv4,
        &udp(GUEST, 9, GUEST, 9, b"spoof"),
    ))
    .unwrap();
    assert!(
        expect(&a2, Duration::from_millis(300), |_| true).is_none(),
        "spoofed frame delivered"
    );
}

#[test]
fn a_nic_can_be_plugged_in_again_after_its_vm_went_away() {
    let net = network(false, 16);
    let nic = |fixed| NicConfig {
        vm_name: "alpha".into(),
        subnet: "s1".into(),
        mac: MAC_A,
        fixed_ip: fixed,
    };
    let port = net.attach(nic(Some(GUEST))).unwrap();
    assert!(
        net.attach(nic(Some(GUEST))).is_err(),
        "MAC in use while plugged"
    );
    drop(port);
    let end = Instant::now() + Duration::from_secs(2);
    let port = loop {
        match net.attach(nic(Some(GUEST))) {
            Ok(p) => break p,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("re-attach: {e}"),
        }
    };
    assert_eq!(gw_mac(&port, MAC_A, GUEST)[..4], [0x02, 0x6b, 0x6c, 0x6e]);
}

fn dns_net(internet: bool, upstream: std::net::SocketAddr) -> Network {
    Network::new(NetworkConfig {
        vpcs: vec![VpcConfig {
            name: "a".into(),
            internet,
            host_access: false,
        }],
        subnets: vec![SubnetConfig {
            name: "s1".into(),
            vpc: "a".into(),
            cidr: "10.1.0.0/24".parse().unwrap(),
            dhcp: true,
            unmanaged: false,
            dns: vec![upstream],
        }],
        ..NetworkConfig::default()
    })
    .unwrap()
}

/// Ask the gateway for `name`; returns the DNS reply payload.
fn ask(port: &Arc<dyn FramePort>, gw: [u8; 6], name: &str, id: u16) -> Option<Vec<u8>> {
    let q = kiln_net::dns::query_message(id, name, 1);
    port.send(&eth(
        MAC_A,
        gw,
        EthernetProtocol::Ipv4,
        &udp(GUEST, 3333, GW, 53, &q),
    ))
    .unwrap();
    let f = expect(port, Duration::from_secs(3), |f| {
        ip_of(f).is_some_and(|(ip, b)| ip.src_addr == GW && b.get(0..2) == Some(&[0, 53][..]))
    })?;
    let (_, b) = ip_of(&f)?;
    Some(b[8..].to_vec())
}

#[test]
fn dns_forwards_upstream_only_with_internet() {
    // A fake upstream resolver on loopback: answers every query with its own ID and a marker.
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        if let Ok((n, from)) = upstream.recv_from(&mut buf) {
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80;
            r.extend_from_slice(b"UPSTREAM");
            let _ = upstream.send_to(&r, from);
            return true;
        }
        false
    });

    let net = dns_net(true, addr);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let gw = gw_mac(&port, MAC_A, GUEST);
    // VM names are answered by the gateway itself.
    let r = ask(&port, gw, "alpha", 7).expect("answer for a VM name");
    assert_eq!(&r[0..2], &[0, 7]);
    // alpha has no address yet (no lease): NXDOMAIN, never forwarded.
    assert_eq!(r[3] & 0x0f, 3);
    let r = ask(&port, gw, "example.test", 9).expect("forwarded answer");
    assert_eq!(&r[0..2], &[0, 9]);
    assert!(r.ends_with(b"UPSTREAM"), "the upstream's answer, relayed");
    assert!(server.join().unwrap(), "the upstream saw the query");

    // Without internet: REFUSED at once, and the upstream is never asked.
    let net = dns_net(false, addr);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let gw = gw_mac(&port, MAC_A, GUEST);
    let r = ask(&port, gw, "example.test", 10).expect("an answer");
    assert_eq!(r[3] & 0x0f, 5, "REFUSED");
}

#[test]
fn host_loopback_is_not_reachable_by_its_own_address() {
    let net = network(true, 16);
    let port = attach(&net, "alpha", "s1", MAC_A);
    let gw = gw_mac(&port, MAC_A, GUEST);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    port.send(&eth(
        MAC_A,
        gw,
        EthernetProtocol::Ipv4,
        &tcp(
            GUEST,
            42000,
            Ipv4Addr::LOCALHOST,
            p,
            TcpControl::Syn,
            1,
            None,
            &[],
        ),
    ))
    .unwrap();
    let r = expect(&port, Duration::from_secs(2), |f| tcp_of(f).is_some()).expect("a reply");
    assert_eq!(tcp_of(&r).unwrap().1, TcpControl::Rst);
    l.set_nonblocking(true).unwrap();
    assert!(
        l.accept().is_err(),
        "a guest reached the host's loopback directly"
    );
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
fn ip_ok(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace made by this test, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// The NAT refuses a guest's flows to an address of the host (here: of a dummy interface in a
/// namespace the test made, where the networks and the host's listeners live) like a closed
/// port, unless the VPC has host access; then they reach the listeners.
#[test]
fn nat_refuses_the_hosts_own_addresses_unless_the_vpc_opts_in() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        kiln_e2e::skip("not root: the host-access test makes a network namespace");
        return;
    }
    let ns = Netns(format!("kiln-hostacc-{}", std::process::id()));
    match std::process::Command::new("ip")
        .args(["netns", "add", &ns.0])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            kiln_e2e::skip(format_args!(
                "`ip netns add` fails here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            std::mem::forget(ns);
            return;
        }
        Err(e) => {
            kiln_e2e::skip(format_args!("`ip` cannot run: {e}"));
            std::mem::forget(ns);
            return;
        }
    }
    ip_ok(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip_ok(&["-n", &ns.0, "tuntap", "add", "dev", "kh0", "mode", "tap"]);
    ip_ok(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "kh0"]);
    ip_ok(&["-n", &ns.0, "link", "set", "kh0", "up"]);
    let host = Ipv4Addr::new(10, 77, 0, 1);
    let path = format!("/run/netns/{}", ns.0);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("the namespace file");
        // SAFETY: setns with a valid descriptor; only this thread (and the network threads it
        // starts) moves into the test's namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let l = TcpListener::bind((host, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let tp = l.local_addr().unwrap().port();
        let u = std::net::UdpSocket::bind((host, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let up = u.local_addr().unwrap().port();
        for (i, host_access) in [false, true].into_iter().enumerate() {
            let net = network_with(true, 16, host_access);
            let port = attach(&net, "alpha", "s1", MAC_A);
            let gw = gw_mac(&port, MAC_A, GUEST);
            let sport = 43000 + i as u16;
            port.send(&eth(
                MAC_A,
                gw,
                EthernetProtocol::Ipv4,
                &tcp(GUEST, sport, host, tp, TcpControl::Syn, 7, None, &[]),
            ))
            .unwrap();
            let r = expect(&port, Duration::from_secs(3), |f| {
                tcp_of(f).is_some_and(|t| t.4 == sport)
            })
            .expect("a reply to the SYN");
            let (ipr, ctl, ack, _, _) = tcp_of(&r).unwrap();
            assert_eq!(ipr.src_addr, host);
            assert_eq!(ack, Some(TcpSeqNumber(8)));
            // Let a connect the NAT made reach the listener before looking.
            std::thread::sleep(Duration::from_millis(100));
            let accepted = l.accept().is_ok();
            let mut b = [0u8; 16];
            port.send(&eth(
                MAC_A,
                gw,
                EthernetProtocol::Ipv4,
                &udp(GUEST, sport, host, up, b"hello"),
            ))
            .unwrap();
            if host_access {
                assert_eq!(ctl, TcpControl::Syn, "SYN-ACK with host access");
                assert!(accepted, "the NAT connected to the host's address");
                let (n, _) = u.recv_from(&mut b).expect("the datagram reached the host");
                assert_eq!(&b[..n], b"hello");
            } else {
                assert_eq!(ctl, TcpControl::Rst, "refused like a closed port");
                assert!(!accepted, "a guest reached a service on the host's address");
                let icmp = expect(&port, Duration::from_secs(2), |f| {
                    ip_of(f).is_some_and(|(ip, _)| ip.next_header == IpProtocol::Icmp)
                })
                .expect("ICMP unreachable for the datagram");
                let (_, body) = ip_of(&icmp).unwrap();
                assert_eq!(body[0], 3, "destination unreachable");
                assert!(
                    u.recv_from(&mut b).is_err(),
                    "the datagram reached the host"
                );
            }
        }
    })
    .join()
    .unwrap();
}
