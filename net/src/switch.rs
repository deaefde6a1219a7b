//! The network thread: one L2 segment per subnet, a gateway per subnet, routing between the
//! subnets of a VPC, and nothing at all between VPCs.
//!
//! Every port has the MAC its NIC was configured with; a frame from a port with another source
//! MAC is dropped, so the MAC table is static and no guest can take another's traffic.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{fmt_mac, ConfigError, NetworkConfig, NicConfig};
use crate::dhcp::DhcpServer;
use crate::frame::{self, BROADCAST, ETH_HDR};
use crate::gateway::{Gateway, VpcView};
use crate::port::{EventFd, FramePort, PortError, MAX_FRAME};

/// Frames taken from one port per loop turn: a flooding guest waits its turn.
const BURST: usize = 64;

pub(crate) enum Ctrl {
    Attach {
        nic: NicConfig,
        port: Arc<dyn FramePort>,
        reply: Sender<Result<Ipv4Addr, ConfigError>>,
    },
    Forward {
        listener: TcpListener,
        guest_ip: Ipv4Addr,
        guest_port: u16,
        reply: Sender<Result<(), ConfigError>>,
    },
    Service {
        port: u16,
        target: SocketAddr,
    },
    Lookup {
        name: String,
        reply: Sender<Vec<Ipv4Addr>>,
    },
    Lease {
        mac: [u8; 6],
        reply: Sender<Option<crate::Lease>>,
    },
}

struct Vpc {
    internet: bool,
    host_access: bool,
    names: HashMap<String, Ipv4Addr>,
}

struct Subnet {
    vpc: usize,
    gw: Gateway,
    ports: Vec<usize>,
}

struct Port {
    port: Arc<dyn FramePort>,
    subnet: usize,
    mac: [u8; 6],
    vm: String,
    dead: bool,
}

struct Forward {
    listener: TcpListener,
    subnet: usize,
    guest_ip: Ipv4Addr,
    guest_port: u16,
}

pub(crate) struct Switch {
    cfg: NetworkConfig,
    vpcs: Vec<Vpc>,
    subnets: Vec<Subnet>,
    subnet_names: HashMap<String, usize>,
    ports: Vec<Port>,
    macs: HashMap<[u8; 6], usize>,
    forwards: Vec<Forward>,
    services: HashMap<u16, SocketAddr>,
    ctrl: Receiver<Ctrl>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

pub(crate) fn gateway_mac(subnet: usize) -> [u8; 6] {
    [0x02, 0x6b, 0x6c, 0x6e, (subnet >> 8) as u8, subnet as u8]
}

impl Switch {
    pub(crate) fn new(
        cfg: NetworkConfig,
        ctrl: Receiver<Ctrl>,
        wake: Arc<EventFd>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, ConfigError> {
        let mut vpcs = Vec::new();
        let mut vpc_names = HashMap::new();
        for v in &cfg.vpcs {
            if vpc_names.insert(v.name.clone(), vpcs.len()).is_some() {
                return Err(ConfigError::Duplicate(v.name.clone()));
            }
            vpcs.push(Vpc {
                internet: v.internet,
                host_access: v.host_access,
                names: HashMap::new(),
            });
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut subnets = Vec::new();
        let mut subnet_names = HashMap::new();
        for (i, s) in cfg.subnets.iter().enumerate() {
            let vpc = *vpc_names
                .get(&s.vpc)
                .ok_or_else(|| ConfigError::UnknownVpc {
                    subnet: s.name.clone(),
                    vpc: s.vpc.clone(),
                })?;
            if subnet_names.insert(s.name.clone(), i).is_some() {
                return Err(ConfigError::Duplicate(s.name.clone()));
            }
            if s.unmanaged && s.cidr.prefix > 29 {
                return Err(ConfigError::UnmanagedTooSmall(s.name.clone()));
            }
            let ip = gateway_ip(s);
            // Guests are told the subnet's own DNS servers when it names some.
            let offered: Vec<Ipv4Addr> = s
                .dns
                .iter()
                .filter_map(|a| match a {
                    SocketAddr::V4(v) if v.port() == 53 => Some(*v.ip()),
                    _ => None,
                })
                .collect();
            let dhcp = (s.dhcp && !s.unmanaged)
                .then(|| DhcpServer::new(s.cidr, ip, cfg.lease_time).with_dns(&offered));
            subnets.push(Subnet {
                vpc,
                gw: Gateway::new(
                    s.cidr,
                    ip,
                    gateway_mac(i),
                    dhcp,
                    s.dns.clone(),
                    (cfg.max_flows_per_subnet, cfg.max_flows_per_guest),
                    seed.wrapping_add(i as u64),
                ),
                ports: Vec::new(),
            });
        }
        Ok(Switch {
            cfg,
            vpcs,
            subnets,
            subnet_names,
            ports: Vec::new(),
            macs: HashMap::new(),
            forwards: Vec::new(),
            services: HashMap::new(),
            ctrl,
            wake,
            stop,
        })
    }

    fn attach(
        &mut self,
        nic: NicConfig,
        port: Arc<dyn FramePort>,
    ) -> Result<Ipv4Addr, ConfigError> {
        let s = *self
            .subnet_names
            .get(&nic.subnet)
            .ok_or_else(|| ConfigError::UnknownSubnet(nic.subnet.clone()))?;
        if nic.mac[0] & 1 == 1 || nic.mac == [0; 6] {
            return Err(ConfigError::BadMac {
                vm: nic.vm_name.clone(),
                mac: fmt_mac(&nic.mac),
            });
        }
        // A NIC whose port went down (its VM stopped) may be plugged in again.
        if let Some(&old) = self.macs.get(&nic.mac) {
            if self.ports[old].dead {
                self.macs.remove(&nic.mac);
                let s_old = self.ports[old].subnet;
                self.subnets[s_old].ports.retain(|&p| p != old);
            }
        }
        if self.macs.contains_key(&nic.mac) {
            return Err(ConfigError::MacTaken {
                vm: nic.vm_name.clone(),
                mac: fmt_mac(&nic.mac),
            });
        }
        let sub = &mut self.subnets[s];
        if let Some(ip) = nic.fixed_ip {
            if !sub.gw.cidr.contains(ip)
                || ip == sub.gw.ip
                || ip == sub.gw.cidr.network()
                || ip == sub.gw.cidr.broadcast()
            {
                return Err(ConfigError::IpOutsideSubnet {
                    vm: nic.vm_name.clone(),
                    ip,
                    subnet: nic.subnet.clone(),
                });
            }
            if sub.gw.mac_of(ip).is_some_and(|m| m != nic.mac) {
                return Err(ConfigError::IpTaken {
                    vm: nic.vm_name.clone(),
                    ip,
                });
            }
            sub.gw.learn(ip, nic.mac);
            self.vpcs[sub.vpc]
                .names
                .entry(nic.vm_name.clone())
                .or_insert(ip);
        }
        if let Some(d) = sub.gw.dhcp.as_mut() {
            d.add_client(nic.mac, &nic.vm_name, nic.fixed_ip);
        }
        let idx = self.ports.len();
        sub.ports.push(idx);
        self.macs.insert(nic.mac, idx);
        tracing::debug!(
            "attached {} ({}) to subnet {}",
            nic.vm_name,
            fmt_mac(&nic.mac),
            nic.subnet
        );
        self.ports.push(Port {
            port,
            subnet: s,
            mac: nic.mac,
            vm: nic.vm_name,
            dead: false,
        });
        Ok(sub.gw.ip)
    }

    fn subnet_of_ip(&self, ip: Ipv4Addr) -> Option<usize> {
        self.subnets.iter().position(|s| s.gw.cidr.contains(ip))
    }

    /// Deliver a frame on subnet `s` (from a port, or from the gateway when `from` is None).
    fn l2_out(&self, s: usize, from: Option<usize>, frame: &[u8]) {
        let Some(dst) = frame::eth_dst(frame) else {
            return;
        };
        let send = |p: &Port| {
            if !p.dead {
                if let Err(e) = p.port.send(frame) {
                    tracing::debug!("port of {}: {e}", p.vm);
                }
            }
        };
        if dst[0] & 1 == 1 {
            for &p in &self.subnets[s].ports {
                if Some(p) != from {
                    send(&self.ports[p]);
                }
            }
        } else if let Some(&p) = self.macs.get(&dst) {
            if Some(p) != from && self.ports[p].subnet == s {
                send(&self.ports[p]);
            }
        }
    }

    fn flush_gateway(&mut self, s: usize) {
        let out = std::mem::take(&mut self.subnets[s].gw.out);
        for f in out {
            self.l2_out(s, None, &f);
        }
        let bound = std::mem::take(&mut self.subnets[s].gw.bound);
        for (mac, ip) in bound {
            if let Some(&p) = self.macs.get(&mac) {
                let vm = self.ports[p].vm.clone();
                let vpc = self.subnets[s].vpc;
                self.vpcs[vpc].names.insert(vm, ip);
            }
        }
    }

    /// Bind a DHCP lease for the NIC `mac` now (see [`crate::Network::lease`]) and make its
    /// VM's name resolve to it, as a DHCP ACK would.
    fn bind_lease(&mut self, mac: [u8; 6]) -> Option<crate::Lease> {
        let p = *self.macs.get(&mac)?;
        let s = self.ports[p].subnet;
        let gw = &mut self.subnets[s].gw;
        let server = gw.dhcp.as_mut()?;
        let ip = server.bind(mac, std::time::Instant::now())?;
        let lease_time = server.lease_time();
        let dns = server.dns().to_vec();
        gw.arp.insert(ip, mac);
        let lease = crate::Lease {
            address: ip,
            prefix: gw.cidr.prefix,
            gateway: gw.ip,
            dns,
            lease_time,
        };
        let vm = self.ports[p].vm.clone();
        let vpc = self.subnets[s].vpc;
        self.vpcs[vpc].names.insert(vm, ip);
        Some(lease)
    }

    /// One frame from port `p`.
    fn port_frame(&mut self, p: usize, frame: &[u8]) {
        let (s, mac) = (self.ports[p].subnet, self.ports[p].mac);
        let (Some(src), Some(dst), Some(et)) = (
            frame::eth_src(frame),
            frame::eth_dst(frame),
            frame::ethertype(frame),
        ) else {
            return;
        };
        if src != mac {
            tracing::trace!(
                "port of {}: dropped frame with foreign source MAC",
                self.ports[p].vm
            );
            return;
        }
        let gw_mac = self.subnets[s].gw.mac;
        let payload = &frame[ETH_HDR..];
        match et {
            0x0806 => {
                self.subnets[s].gw.handle_arp(src, payload);
            }
            0x0800 if dst == gw_mac || dst == BROADCAST => {
                let to_gw = dst == gw_mac;
                if to_gw {
                    if let Some(dst_ip) = ipv4_dst(payload) {
                        let vpc = self.subnets[s].vpc;
                        match self.subnet_of_ip(dst_ip) {
                            Some(t) if t != s && self.subnets[t].vpc == vpc => {
                                // Routed to another subnet of the VPC.
                                self.subnets[s]
                                    .gw
                                    .learn(ipv4_src(payload).unwrap_or(Ipv4Addr::UNSPECIFIED), src);
                                let mut pkt = payload.to_vec();
                                if frame::forward_ipv4(&mut pkt).is_some() {
                                    self.subnets[t].gw.emit_ip(pkt);
                                    self.flush_gateway(t);
                                }
                                self.flush_gateway(s);
                                return;
                            }
                            _ => {}
                        }
                    }
                }
                let vpc = &self.vpcs[self.subnets[s].vpc];
                let view = VpcView {
                    internet: vpc.internet,
                    host_access: vpc.host_access,
                    names: &vpc.names,
                    alias: self.cfg.host_loopback_alias,
                    services: &self.services,
                };
                self.subnets[s].gw.handle_ipv4(src, to_gw, payload, &view);
            }
            _ => {}
        }
        if dst != gw_mac {
            self.l2_out(s, Some(p), frame);
        }
        self.flush_gateway(s);
    }

    fn handle_ctrl(&mut self) {
        while let Ok(c) = self.ctrl.try_recv() {
            match c {
                Ctrl::Attach { nic, port, reply } => {
                    let r = self.attach(nic, port);
                    let _ = reply.send(r);
                }
                Ctrl::Forward {
                    listener,
                    guest_ip,
                    guest_port,
                    reply,
                } => {
                    let r = match self.subnet_of_ip(guest_ip) {
                        Some(subnet) => listener
                            .set_nonblocking(true)
                            .map(|_| {
                                self.forwards.push(Forward {
                                    listener,
                                    subnet,
                                    guest_ip,
                                    guest_port,
                                })
                            })
                            .map_err(ConfigError::Io),
                        None => Err(ConfigError::NoSubnetFor(guest_ip)),
                    };
                    let _ = reply.send(r);
                }
                Ctrl::Service { port, target } => {
                    self.services.insert(port, target);
                }
                Ctrl::Lease { mac, reply } => {
                    let _ = reply.send(self.bind_lease(mac));
                }
                Ctrl::Lookup { name, reply } => {
                    let ips = self
                        .vpcs
                        .iter()
                        .filter_map(|v| v.names.get(&name).copied())
                        .collect();
                    let _ = reply.send(ips);
                }
            }
        }
    }

    pub(crate) fn run(mut self) {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut busy = false;
        let mut fds: Vec<libc::pollfd> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            fds.clear();
            fds.push(libc::pollfd {
                fd: self.wake.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for p in self.ports.iter().filter(|p| !p.dead) {
                fds.push(libc::pollfd {
                    fd: p.port.rx_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for f in &self.forwards {
                fds.push(libc::pollfd {
                    fd: f.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let mut timeout = Duration::from_secs(1);
            for s in &mut self.subnets {
                s.gw.pollfds(&mut fds);
                if let Some(d) = s.gw.poll_delay() {
                    timeout = timeout.min(d);
                }
            }
            let ms = if busy {
                0
            } else {
                timeout.as_millis().clamp(0, 1000) as i32
            };
            // SAFETY: `fds` is a live, correctly sized array of pollfd for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("network poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.wake.clear();
            self.handle_ctrl();
            busy = false;

            for p in 0..self.ports.len() {
                if self.ports[p].dead {
                    continue;
                }
                let mut n = 0;
                while n < BURST {
                    match self.ports[p].port.recv(&mut buf) {
                        Ok(Some(len)) => self.port_frame(p, &buf[..len]),
                        Ok(None) => break,
                        Err(PortError::TooLarge(len)) => {
                            tracing::debug!(
                                "port of {}: dropped {len}-byte frame",
                                self.ports[p].vm
                            );
                        }
                        Err(PortError::Closed) => {
                            tracing::info!("port of {} closed", self.ports[p].vm);
                            self.ports[p].dead = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!("port of {} is down: {e}", self.ports[p].vm);
                            self.ports[p].dead = true;
                            break;
                        }
                    }
                    n += 1;
                }
                if n == BURST {
                    busy = true;
                }
            }

            for i in 0..self.forwards.len() {
                while let Ok((stream, _)) = self.forwards[i].listener.accept() {
                    let f = &self.forwards[i];
                    let (s, ip, port) = (f.subnet, f.guest_ip, f.guest_port);
                    let _ = stream.set_nodelay(true);
                    self.subnets[s].gw.open_forward(stream, ip, port);
                }
            }

            for s in 0..self.subnets.len() {
                if self.subnets[s].gw.service() {
                    busy = true;
                }
                self.flush_gateway(s);
            }
        }
    }
}

/// The gateway's address: the first usable one, or the second-to-last on unmanaged subnets.
pub(crate) fn gateway_ip(s: &crate::config::SubnetConfig) -> Ipv4Addr {
    if s.unmanaged {
        Ipv4Addr::from(u32::from(s.cidr.last_host()) - 1)
    } else {
        s.cidr.first_host()
    }
}

fn ipv4_dst(p: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = p.get(16..20)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}
fn ipv4_src(p: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = p.get(12..16)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}
