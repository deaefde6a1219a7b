//! Real Linux driver against kiln's vhost-user-net: the Debian cloud kernel boots under
//! `qemu-system-x86_64 -accel tcg` with a busybox initramfs; its virtio_net driver gets a
//! DHCP lease from the kiln-net gateway, then fetches a file from an HTTP server this test
//! runs on the host's loopback, through the switch's NAT (the guest connects to the
//! network's host-loopback alias, which the NAT carries to 127.0.0.1). The guest prints the
//! file's SHA-256; the test compares. Skips loudly where qemu or the kernel cannot be had.

// For its stderr log of kiln's warnings (this test needs no /dev/kvm).

use crate::kvm_support;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::net_guest::{
    guest_nic, initramfs, mac_string, network, pattern, vhost_user_net_args, ALIAS,
};
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;
use kiln_vmm::devices::net::vhost_user::spawn;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x00, 0x01];
const FILE_LEN: usize = 3 << 20;

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

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn linux_virtio_net_fetches_through_kiln_nat() {
    kvm_support::log_warnings();
    if !qemu_available() {
        return skip("qemu-system-x86_64 is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let body = pattern(FILE_LEN);
    let file = dir.path().join("file");
    std::fs::write(&file, &body).unwrap();
    let want = sha256_hex(&file);
    let port = kiln_e2e::http::Server::bytes(body).port;

    let net = network("10.0.5.0/24");
    let nic = guest_nic(&net, MAC);
    let sock = dir.path().join("net.sock");
    let handle = spawn(&sock, nic, MAC).unwrap();

    let initrd = dir.path().join("initrd.cpio");
    initramfs(&kernel, &init(port), &initrd);
    let mac = mac_string(&MAC);
    let cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log"))
        .arg(vhost_user_net_args(&sock, &MAC));
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
