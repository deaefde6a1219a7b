//! Building the few frames the gateway writes itself (ARP, UDP, TCP RST, ICMP errors).

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

pub(crate) const ETH_HDR: usize = 14;
pub(crate) const BROADCAST: [u8; 6] = [0xff; 6];

pub(crate) fn eth_dst(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(0..6)?.try_into().ok()
}
pub(crate) fn eth_src(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12)?.try_into().ok()
}
pub(crate) fn ethertype(frame: &[u8]) -> Option<u16> {
    let b = frame.get(12..14)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// An Ethernet frame around an IP packet.
pub(crate) fn wrap_ipv4(src: [u8; 6], dst: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; ETH_HDR + ip.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut f[..]);
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut frame);
    f[ETH_HDR..].copy_from_slice(ip);
    f
}

pub(crate) fn arp_frame(
    op: ArpOperation,
    src_mac: [u8; 6],
    src_ip: Ipv4Addr,
    dst_mac: [u8; 6],
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: EthernetAddress(src_mac),
        source_protocol_addr: src_ip,
        target_hardware_addr: EthernetAddress(target_mac),
        target_protocol_addr: target_ip,
    };
    let mut f = vec![0u8; ETH_HDR + repr.buffer_len()];
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    repr.emit(&mut ArpPacket::new_unchecked(&mut f[ETH_HDR..]));
    f
}

fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    let mut p = vec![0u8; repr.buffer_len() + payload_len];
    let mut pkt = Ipv4Packet::new_unchecked(&mut p[..]);
    repr.emit(&mut pkt, &ChecksumCapabilities::default());
    body(pkt.payload_mut());
    p
}

/// A UDP datagram as a bare IPv4 packet.
pub(crate) fn udp_packet(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    ipv4_packet(src, dst, IpProtocol::Udp, len, |buf| {
        let repr = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        repr.emit(
            &mut UdpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
    })
}

/// The RST a closed port answers `tcp` with: what "connection refused" looks like.
pub(crate) fn tcp_rst_for(ip: &Ipv4Repr, tcp: &TcpRepr) -> Option<Vec<u8>> {
    if tcp.control == TcpControl::Rst {
        return None;
    }
    let (seq, ack) = match tcp.ack_number {
        Some(a) => (a, None),
        None => (
            smoltcp::wire::TcpSeqNumber(0),
            Some(tcp.seq_number + tcp.segment_len()),
        ),
    };
    let reply = TcpRepr {
        src_port: tcp.dst_port,
        dst_port: tcp.src_port,
        control: TcpControl::Rst,
        seq_number: seq,
        ack_number: ack,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (ip.dst_addr, ip.src_addr);
    Some(ipv4_packet(
        src,
        dst,
        IpProtocol::Tcp,
        reply.buffer_len(),
        |buf| {
            reply.emit(
                &mut TcpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        },
    ))
}

/// An ICMP destination-unreachable error about `packet` (a whole IPv4 packet), sent from
/// `from`.
pub(crate) fn icmp_unreachable(
    from: Ipv4Addr,
    packet: &[u8],
    reason: Icmpv4DstUnreachable,
) -> Option<Vec<u8>> {
    let pkt = Ipv4Packet::new_checked(packet).ok()?;
    let header = Ipv4Repr::parse(&pkt, &ChecksumCapabilities::ignored()).ok()?;
    // Quote the header and 8 bytes of payload, as RFC 792 asks.
    let hl = pkt.header_len() as usize;
    let data = packet.get(hl..(hl + 8).min(packet.len()))?;
    let repr = Icmpv4Repr::DstUnreachable {
        reason,
        header,
        data,
    };
    let dst = header.src_addr;
    Some(ipv4_packet(
        from,
        dst,
        IpProtocol::Icmp,
        repr.buffer_len(),
        |buf| {
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        },
    ))
}

/// Rewrite an IPv4 packet for forwarding: TTL minus one (checksum fixed). `None` when the TTL
/// runs out.
pub(crate) fn forward_ipv4(packet: &mut [u8]) -> Option<()> {
    let mut pkt = Ipv4Packet::new_checked(&mut packet[..]).ok()?;
    let ttl = pkt.hop_limit();
    if ttl <= 1 {
        return None;
    }
    pkt.set_hop_limit(ttl - 1);
    pkt.fill_checksum();
    Some(())
}
