//! kiln-net: one isolated network per module, in user space.
//!
//! [`FramePort`] is the contract between a NIC (kiln-vmm's virtio-net, in process or over
//! vhost-user) and whatever carries its Ethernet frames (the module switch, a TAP device).
//! [`Network`] is the module network: a thread running an L2 switch per subnet, a gateway per
//! subnet (ARP, DHCP, DNS, NAT through smoltcp to host sockets), routing between the subnets
//! of a VPC and none between VPCs.

mod config;
pub mod dhcp;
pub mod dns;
mod frame;
mod gateway;
mod host_local;
mod http_dir;
mod icmp_nat;
mod port;
mod seqpacket;
pub mod stream;
mod switch;
mod tap;

#[doc(hidden)]
pub mod fuzz;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use config::{ConfigError, Ipv4Cidr, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};
pub use http_dir::HttpDir;
pub use port::{port_pair, FramePort, PortError, QueuePort, MAX_FRAME};
pub use seqpacket::{seqpacket_pair, SeqpacketPort};
pub use tap::TapPort;

use port::EventFd;
use switch::{Ctrl, Switch};

/// Frames queued per direction of a NIC's port.
const PORT_QUEUE: usize = 1024;

/// A DHCP lease bound ahead of the guest's own DHCP exchange ([`Network::lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The subnet's gateway: the default route.
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub lease_time: std::time::Duration,
}

/// A running module network. Dropping it stops its thread.
pub struct Network {
    ctrl: Mutex<mpsc::Sender<Ctrl>>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    gateways: Vec<(String, Ipv4Addr)>,
    http: Mutex<Vec<HttpDir>>,
}

impl Network {
    /// Check the configuration and start the network thread.
    pub fn new(cfg: NetworkConfig) -> Result<Network, ConfigError> {
        let gateways = cfg
            .subnets
            .iter()
            .map(|s| (s.name.clone(), switch::gateway_ip(s)))
            .collect();
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let sw = Switch::new(cfg, rx, wake.clone(), stop.clone())?;
        let thread = std::thread::Builder::new()
            .name("kiln-net".into())
            .spawn(move || sw.run())?;
        Ok(Network {
            ctrl: Mutex::new(tx),
            wake,
            stop,
            thread: Some(thread),
            gateways,
            http: Mutex::new(Vec::new()),
        })
    }

    fn send(&self, c: Ctrl) -> Result<(), ConfigError> {
        let tx = self.ctrl.lock().map_err(|_| ConfigError::Stopped)?;
        tx.send(c).map_err(|_| ConfigError::Stopped)?;
        self.wake.signal();
        Ok(())
    }

    /// Plug a NIC into its subnet; the returned port is what the virtio-net device uses.
    pub fn attach(&self, nic: NicConfig) -> Result<Arc<dyn FramePort>, ConfigError> {
        let (nic_end, switch_end) = port_pair(PORT_QUEUE)?;
        self.attach_port(nic, Arc::new(switch_end))?;
        Ok(Arc::new(nic_end))
    }

    /// Plug an existing frame port (a TAP device, say) into the switch as the NIC `nic`.
    /// Returns the subnet's gateway address.
    pub fn attach_port(
        &self,
        nic: NicConfig,
        port: Arc<dyn FramePort>,
    ) -> Result<Ipv4Addr, ConfigError> {
        let (reply, rx) = mpsc::channel();
        self.send(Ctrl::Attach { nic, port, reply })?;
        rx.recv().map_err(|_| ConfigError::Stopped)?
    }

    /// Plug the TAP device `name` into the switch (created if it does not exist).
    pub fn attach_tap(&self, nic: NicConfig, name: &str) -> Result<Ipv4Addr, ConfigError> {
        let tap = TapPort::open(name)?;
        self.attach_port(nic, Arc::new(tap))
    }

    /// The gateway address of `subnet` (the guests' router, DNS server and `{{ .HTTPIP }}`).
    pub fn gateway(&self, subnet: &str) -> Option<Ipv4Addr> {
        self.gateways
            .iter()
            .find(|(n, _)| n == subnet)
            .map(|(_, ip)| *ip)
    }

    /// Forward connections to `host_addr` (port 0 picks one) to `guest_ip:guest_port`.
    /// Returns the address actually listened on. `guest_ip` names the first subnet that
    /// contains it.
    pub fn add_port_forward(
        &self,
        host_addr: SocketAddr,
        guest_ip: Ipv4Addr,
        guest_port: u16,
    ) -> Result<SocketAddr, ConfigError> {
        let listener = TcpListener::bind(host_addr)?;
        let addr = listener.local_addr()?;
        let (reply, rx) = mpsc::channel();
        self.send(Ctrl::Forward {
            listener,
            guest_ip,
            guest_port,
            reply,
        })?;
        rx.recv().map_err(|_| ConfigError::Stopped)??;
        Ok(addr)
    }

    /// Serve the files of `dir` to every guest at `http://<its gateway>:<port>/<name>`
    /// (VPCs without internet included: the server is part of the build network).
    pub fn http_dir(&self, dir: &Path, port: u16) -> Result<(), ConfigError> {
        let server = HttpDir::start(dir)?;
        self.send(Ctrl::Service {
            port,
            target: server.addr(),
        })?;
        self.http
            .lock()
            .map_err(|_| ConfigError::Stopped)?
            .push(server);
        Ok(())
    }

    /// The addresses the VM `name` has (by fixed IP or DHCP lease), one per VPC it is in.
    pub fn resolve(&self, name: &str) -> Result<Vec<Ipv4Addr>, ConfigError> {
        let (reply, rx) = mpsc::channel();
        self.send(Ctrl::Lookup {
            name: name.to_string(),
            reply,
        })?;
        rx.recv().map_err(|_| ConfigError::Stopped)
    }

    /// Bind the DHCP lease of the attached NIC `mac` now, so that kiln can hand the guest its
    /// address before the guest's DHCP client runs (which then gets the same one). `None`
    /// when the NIC is not attached, its subnet serves no DHCP, or the pool is exhausted.
    pub fn lease(&self, mac: [u8; 6]) -> Result<Option<Lease>, ConfigError> {
        let (reply, rx) = mpsc::channel();
        self.send(Ctrl::Lease { mac, reply })?;
        rx.recv().map_err(|_| ConfigError::Stopped)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
