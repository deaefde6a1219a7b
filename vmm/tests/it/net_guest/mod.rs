//! A Linux guest on kiln's vhost-user-net, as the real-driver net test and the `net_bench`
//! benchmark set it up (the benchmark includes this file by path): a kiln-net network with one
//! DHCP subnet, NAT and a host-loopback alias; a busybox initramfs with the virtio-net driver
//! and a udhcpc script; QEMU's arguments for the vhost-user netdev; the pseudo-random file the
//! guest downloads (from the test kit's `http::Server`).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::KernelFiles;
use kiln_net::{FramePort, Network, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};

/// The host as the guest sees it: kiln-net's loopback alias (and QEMU slirp's gateway).
pub const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// udhcpc's hook: configures the lease and prints it (`KILN-NET-LEASE ...`).
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in bound|renew)
  ip addr flush dev $interface
  ip addr add $ip/$mask dev $interface
  [ -n "$router" ] && ip route add default via $router
  echo "KILN-NET-LEASE ip=$ip router=$router dns=$dns hostname=$hostname"
;; esac
exit 0
"#;

/// One VPC with internet (NAT) and one DHCP subnet on `cidr`, the host reachable at [`ALIAS`].
pub fn network(cidr: &str) -> Network {
    Network::new(NetworkConfig {
        vpcs: vec![VpcConfig {
            name: "default".into(),
            internet: true,
            host_access: false,
        }],
        subnets: vec![SubnetConfig {
            name: "default".into(),
            vpc: "default".into(),
            cidr: cidr.parse().expect("cidr"),
            dhcp: true,
            unmanaged: false,
            dns: Vec::new(),
        }],
        host_loopback_alias: Some(ALIAS),
        ..NetworkConfig::default()
    })
    .expect("kiln network")
}

/// The port of a NIC with `mac` for the VM `guest` on the network's subnet.
pub fn guest_nic(net: &Network, mac: [u8; 6]) -> Arc<dyn FramePort> {
    net.attach(NicConfig {
        vm_name: "guest".into(),
        subnet: "default".into(),
        mac,
        fixed_ip: None,
    })
    .expect("attach nic")
}

/// The guest's initramfs at `out`: busybox, virtio_pci and virtio_net, the udhcpc script,
/// and `init` as `/init`'s script.
pub fn initramfs(kernel: &KernelFiles, init: &str, out: &Path) {
    Initramfs::new()
        .busybox()
        .kernel(kernel)
        .module("virtio_pci")
        .module("virtio_net")
        .file("/udhcpc.sh", UDHCPC_SCRIPT, 0o755)
        .init_script(init)
        .build(out)
        .expect("initramfs");
}

/// `52:54:...` as QEMU and /sys print it.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// QEMU's arguments for a virtio-net-pci device on the vhost-user backend at `sock`.
pub fn vhost_user_net_args(sock: &Path, mac: &[u8; 6]) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=n0,path={}", sock.display()),
        "-netdev".into(),
        "vhost-user,id=n0,chardev=n0".into(),
        "-device".into(),
        // vectors=0 (INTx): QEMU 7.2 crashes in msix_set_vector_notifiers when a vhost-user
        // netdev starts with MSI-X.
        format!("virtio-net-pci,netdev=n0,mac={},vectors=0", mac_string(mac)),
    ]
}

/// `len` pseudo-random bytes, the same on every call.
pub fn pattern(len: usize) -> Vec<u8> {
    kiln_e2e::pattern::pattern(0x2545_f491_4f6c_dd1d, len)
}
