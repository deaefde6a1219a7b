//! Real Linux driver against kiln's vhost-user-net: the Debian cloud kernel boots under
//! `qemu-system-x86_64 -accel tcg` with a busybox initramfs; its virtio_net driver gets a
//! DHCP lease from the kiln-net gateway, then fetches a file from an HTTP server this test
//! runs on the host's loopback, through the switch's NAT (the guest connects to the
//! network's host-loopback alias, which the NAT carries to 127.0.0.1). The guest prints the
//! file's SHA-256; the test compares. Skips loudly where qemu or the kernel cannot be had.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;
use kiln_net::{Network, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};
use kiln_vmm::devices::net::vhost_user::spawn;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x00, 0x01];
const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const FILE_LEN: usize = 3 << 20;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in bound|renew)
  ip addr flush dev $interface
  ip addr add $ip/$mask dev $interface
  [ -n "$router" ] && ip route add default via $router
  echo "KILN-NET-LEASE ip=$ip router=$router dns=$dns hostname=$hostname"
;; esac
exit 0
"#;

fn init(port: u16) -> String {
    format!(
        r#"
ip link set lo up
if ! ip link set eth0 up; then echo "KILN-NET-FAIL no eth0"; echo KILN-NET-DONE; poweroff -f; fi
echo "kiln-net: mac=$(cat /sys/class/net/eth0/address)"
if ! udhcpc -i eth0 -n -q -t 10 -T 2 -s /udhcpc.sh; then echo "KILN-NET-FAIL dhcp"; fi
start=$(date +%s)
if wget -q -O /tmp/file http://{ALIAS}:{port}/file; then
  echo "KILN-NET-SUM $(sha256sum /tmp/file | cut -d' ' -f1) in $(( $(date +%s) - start )) s"
else
  echo "KILN-NET-FAIL wget"
fi
# What a reboot does to the device, inside one vhost-user connection: the driver resets it
# and sets it up again.
if rmmod virtio_net && insmod /lib/modules/virtio_net.ko; then
  ip link set eth0 up
  udhcpc -i eth0 -n -q -t 10 -T 2 -s /udhcpc.sh >/dev/null 2>&1 || echo "KILN-NET-FAIL dhcp after reset"
  if wget -q -O /tmp/file2 http://{ALIAS}:{port}/file; then
    echo "KILN-NET-SUM2 $(sha256sum /tmp/file2 | cut -d' ' -f1)"
  else
    echo "KILN-NET-FAIL wget after reset"
  fi
else
  echo "KILN-NET-FAIL reload"
fi
echo KILN-NET-DONE
poweroff -f
"#
    )
}

fn pattern() -> Vec<u8> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..FILE_LEN)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Serve `body` at any path on the host's loopback; returns the port.
fn http_server(body: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().take(8) {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 2048];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
    port
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Prints warnings and errors from kiln's code to the test output (no subscriber crate is a
/// dependency of kiln-vmm's tests).
struct StderrLog;

struct Fields(String);
impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for StderrLog {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        eprintln!("{} {}:{}", e.metadata().level(), e.metadata().target(), f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn linux_virtio_net_fetches_through_kiln_nat() {
    let _ = tracing::subscriber::set_global_default(StderrLog);
    if !qemu_available() {
        return skip("qemu-system-x86_64 is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let body = pattern();
    let file = dir.path().join("file");
    std::fs::write(&file, &body).unwrap();
    let want = sha256_hex(&file);
    let port = http_server(body);

    let net = Network::new(NetworkConfig {
        vpcs: vec![VpcConfig {
            name: "default".into(),
            internet: true,
        }],
        subnets: vec![SubnetConfig {
            name: "default".into(),
            vpc: "default".into(),
            cidr: "10.0.5.0/24".parse().unwrap(),
            dhcp: true,
            unmanaged: false,
            dns: Vec::new(),
        }],
        host_loopback_alias: Some(ALIAS),
        ..NetworkConfig::default()
    })
    .unwrap();
    let nic = net
        .attach(NicConfig {
            vm_name: "guest".into(),
            subnet: "default".into(),
            mac: MAC,
            fixed_ip: None,
        })
        .unwrap();
    let sock = dir.path().join("net.sock");
    let handle = spawn(&sock, nic, MAC).unwrap();

    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("virtio_net")
        .file("/udhcpc.sh", UDHCPC_SCRIPT, 0o755)
        .init_script(&init(port))
        .build(&initrd)
        .unwrap();
    let mac = MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log")).arg([
        "-chardev".to_string(),
        format!("socket,id=n0,path={}", sock.display()),
        "-netdev".to_string(),
        "vhost-user,id=n0,chardev=n0".to_string(),
        "-device".to_string(),
        // vectors=0 (INTx): QEMU 7.2 crashes in msix_set_vector_notifiers when a vhost-user
        // netdev starts with MSI-X.
        format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
    ]);
    let started = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    if let Err(e) = vm.wait_for("KILN-NET-DONE", Duration::from_secs(180)) {
        panic!("guest did not finish: {e}");
    }
    let out = vm.output();
    eprintln!(
        "{out}\nguest run took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !out.contains("KILN-NET-FAIL"),
        "guest reported a failure:\n{out}"
    );
    assert!(
        out.contains(&format!("kiln-net: mac={mac}")),
        "MAC from the config:\n{out}"
    );
    assert!(
        out.contains("KILN-NET-LEASE ip=10.0.5.") && out.contains("hostname=guest"),
        "no DHCP lease:\n{out}"
    );
    assert!(
        out.contains(&format!("KILN-NET-SUM {want}")),
        "file fetched through the NAT differs (want {want}):\n{out}"
    );
    assert!(
        out.contains(&format!("KILN-NET-SUM2 {want}")),
        "no fetch after the device reset (want {want}):\n{out}"
    );
    assert_eq!(
        handle.connections(),
        1,
        "the reset stayed inside one connection"
    );
    assert_eq!(net.resolve("guest").unwrap().len(), 1);
    vm.wait_exit(Duration::from_secs(20));
    handle.stop();
    handle.join().unwrap();
}
