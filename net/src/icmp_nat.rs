//! ICMP echo (ping) from guests to outside addresses, carried on one host ICMP socket per
//! gateway: an unprivileged ping socket where `net.ipv4.ping_group_range` allows it, else a
//! raw socket (root). Neither: echo requests are dropped (logged once), as "where the host
//! allows it" asks.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};

const MAX_PENDING: usize = 256;
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

struct Pending {
    guest: Ipv4Addr,
    guest_ident: u16,
    /// The address the guest pinged (the loopback alias, where mapped).
    shown: Ipv4Addr,
    deadline: Instant,
}

pub(crate) struct IcmpNat {
    sock: Option<(socket2::Socket, bool)>,
    tried: bool,
    ident: u16,
    pending: HashMap<(Ipv4Addr, u16), Pending>,
}

impl IcmpNat {
    pub(crate) fn new(ident: u16) -> Self {
        IcmpNat {
            sock: None,
            tried: false,
            ident,
            pending: HashMap::new(),
        }
    }

    fn socket(&mut self) -> Option<&(socket2::Socket, bool)> {
        if self.sock.is_none() && !self.tried {
            self.tried = true;
            let open = |ty| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    ty,
                    Some(socket2::Protocol::ICMPV4),
                )?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            };
            self.sock = match open(socket2::Type::DGRAM) {
                Ok(s) => Some((s, false)),
                Err(_) => {
                    match open(socket2::Type::RAW) {
                        Ok(s) => Some((s, true)),
                        Err(e) => {
                            tracing::info!("no ICMP socket on this host ({e}): guest pings to outside are dropped");
                            None
                        }
                    }
                }
            };
        }
        self.sock.as_ref()
    }

    /// An echo request from `guest` to `target` (shown to the guest as `shown`).
    pub(crate) fn request(
        &mut self,
        guest: Ipv4Addr,
        shown: Ipv4Addr,
        target: Ipv4Addr,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) {
        let now = Instant::now();
        self.pending.retain(|_, p| p.deadline > now);
        if self.pending.len() >= MAX_PENDING {
            return;
        }
        let my_ident = self.ident;
        let Some((sock, _)) = self.socket() else {
            return;
        };
        let repr = Icmpv4Repr::EchoRequest {
            ident: my_ident,
            seq_no: seq,
            data,
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut buf[..]),
            &ChecksumCapabilities::default(),
        );
        let to = SocketAddr::V4(SocketAddrV4::new(target, 0));
        if sock.send_to(&buf, &to.into()).is_ok() {
            self.pending.insert(
                (target, seq),
                Pending {
                    guest,
                    guest_ident: ident,
                    shown,
                    deadline: now + ECHO_TIMEOUT,
                },
            );
        }
    }

    /// Echo replies that arrived: (from as the guest knows it, guest, ident, seq, data).
    pub(crate) fn replies(&mut self) -> Vec<(Ipv4Addr, Ipv4Addr, u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        let Some((sock, raw)) = self.sock.as_ref() else {
            return out;
        };
        let raw = *raw;
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        for _ in 0..64 {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            // SAFETY: recv_from initialised the first `n` bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let Some(from) = from.as_socket_ipv4().map(|a| *a.ip()) else {
                continue;
            };
            let icmp = if raw {
                match Ipv4Packet::new_checked(&bytes[..]) {
                    Ok(p) => p.payload().to_vec(),
                    Err(_) => continue,
                }
            } else {
                bytes
            };
            let Ok(pkt) = Icmpv4Packet::new_checked(&icmp[..]) else {
                continue;
            };
            let Ok(Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            }) = Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::ignored())
            else {
                continue;
            };
            // A raw socket sees every echo reply on the host: keep only ours.
            if raw && ident != self.ident {
                continue;
            }
            if let Some(p) = self.pending.remove(&(from, seq_no)) {
                out.push((p.shown, p.guest, p.guest_ident, seq_no, data.to_vec()));
            }
        }
        out
    }

    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|(s, _)| s.as_raw_fd())
    }

    pub(crate) fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// An echo reply as a bare IPv4 packet.
pub(crate) fn echo_reply(
    from: Ipv4Addr,
    to: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoReply {
        ident,
        seq_no: seq,
        data,
    };
    let ip = smoltcp::wire::Ipv4Repr {
        src_addr: from,
        dst_addr: to,
        next_header: smoltcp::wire::IpProtocol::Icmp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut p = vec![0u8; ip.buffer_len() + repr.buffer_len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut p[..]);
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(pkt.payload_mut()),
        &ChecksumCapabilities::default(),
    );
    p
}
