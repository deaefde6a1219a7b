//! All three of kiln's vhost-user devices in one real Linux guest: the Debian cloud kernel
//! boots under `qemu-system-x86_64 -accel tcg` (memory in a shared memfd) with a busybox
//! initramfs and kiln's blk, net and vsock backends attached at once. Inside, the guest
//! writes a pattern to the disk (a qcow2 on kiln-disk) and reads it back, fetches a file
//! from an HTTP server this test runs on the host's loopback through the kiln-net switch's
//! NAT, and talks to the host over vsock both ways. The host then runs `qemu-img check` on
//! the disk and compares its content. Each device's deeper checks (resets, reconnects, many
//! connections) are in blk_qemu.rs, net_qemu.rs and vsock_qemu.rs; this one shows they work
//! side by side in one guest. Skips loudly where qemu, qemu-img, rustc or the kernel cannot
//! be had. No traffic leaves the machine: the NAT's only destination is 127.0.0.1.

use crate::net_guest;
use crate::vsock_guest;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net_guest::{guest_nic, network, vhost_user_net_args, ALIAS, UDHCPC_SCRIPT};
use crate::vsock_guest::{build_helper, echo_through_guest, host_echo_listener};
use kiln_disk::{BlockDevice, OpenOptions};
use kiln_e2e::image::checked_contents;
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;
use kiln_vmm::devices::block::BlockOptions;

const DISK_MIB: u64 = 32;
/// Where the guest writes the disk pattern (dd bs=64k seek=16).
const PATTERN_OFFSET: usize = 1 << 20;
const PATTERN_LEN: usize = 1 << 20;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x00, 0x07];
const FILE_LEN: usize = 1 << 20;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 5000;
const GUEST_TO_HOST_BYTES: usize = 1 << 20;
const HOST_TO_GUEST_BYTES: usize = 2 << 20;

fn init(http_port: u16) -> String {
    format!(
        r#"
echo "kiln-all: up"
# The disk: write, read back with direct I/O, compare.
if [ ! -b /dev/vda ]; then echo "KILN-ALL-FAIL no /dev/vda"; fi
dd if=/pattern.bin of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/tmp/e || echo "KILN-ALL-FAIL blk write: $(cat /tmp/e)"
dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=16 iflag=direct 2>/tmp/e || echo "KILN-ALL-FAIL blk read: $(cat /tmp/e)"
if cmp /pattern.bin /tmp/back; then echo "KILN-ALL-BLK-OK"; else echo "KILN-ALL-FAIL blk compare"; fi
# The network: a DHCP lease from kiln-net, then a file from the host's loopback via the NAT.
ip link set lo up
ip link set eth0 up || echo "KILN-ALL-FAIL no eth0"
udhcpc -i eth0 -n -q -t 10 -T 2 -s /udhcpc.sh || echo "KILN-ALL-FAIL dhcp"
if wget -q -O /tmp/file http://{ALIAS}:{http_port}/file; then
  echo "KILN-ALL-NET-SUM $(sha256sum /tmp/file | cut -d' ' -f1)"
else
  echo "KILN-ALL-FAIL wget"
fi
# vsock, guest to host: CID 2 port {HOST_PORT} is the listener at <uds>_{HOST_PORT}.
/vsock-helper connect 2 {HOST_PORT} {GUEST_TO_HOST_BYTES} 21 || echo "KILN-ALL-FAIL vsock connect"
# vsock, host to guest: an echo service the host reaches with CONNECT {GUEST_PORT}.
/vsock-helper listen {GUEST_PORT} &
sleep 600
"#
    )
}

fn sha256_hex(data: &[u8], dir: &std::path::Path) -> String {
    let f = dir.join("sha-input");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn linux_uses_kiln_blk_net_and_vsock_in_one_guest() {
    if !qemu_available() {
        return skip("qemu-system-x86_64 is not installed");
    }
    let qemu_img = Command::new("qemu-img").arg("--version").output();
    if !qemu_img.is_ok_and(|o| o.status.success()) {
        return skip("qemu-img is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("vsock-helper");
    if let Err(e) = build_helper(&helper) {
        return skip(format!("cannot build the static guest helper: {e}"));
    }

    // The disk: an empty qcow2 served through kiln-disk.
    let img = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(format!("{DISK_MIB}M"))
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create failed");
    let disk: Arc<dyn BlockDevice> = kiln_disk::open(&img, OpenOptions::read_write()).unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let blk = kiln_vmm::devices::block::vhost_user::spawn(
        &blk_sock,
        disk.clone(),
        BlockOptions {
            serial: "kiln-all".into(),
            ..BlockOptions::default()
        },
    )
    .unwrap();

    // The network: a kiln-net switch with DHCP and NAT, and a file on the host's loopback.
    let body = net_guest::pattern(FILE_LEN);
    let want_sum = sha256_hex(&body, dir.path());
    let http_port = kiln_e2e::http::Server::bytes(body).port;
    let net = network("10.0.7.0/24");
    let net_sock = dir.path().join("net.sock");
    let nic =
        kiln_vmm::devices::net::vhost_user::spawn(&net_sock, guest_nic(&net, MAC), MAC).unwrap();

    // vsock: the guest's socket, and a host echo listener for its port.
    let vsock_sock = dir.path().join("vsock.vhost");
    let uds = dir.path().join("vsock.sock");
    let _listener = host_echo_listener(kiln_vmm::devices::vsock::muxer::unix::guest_port_path(
        &uds, HOST_PORT,
    ));
    let vsock = kiln_vmm::devices::vsock::vhost_user::spawn(&vsock_sock, &uds, GUEST_CID)
        .expect("spawn vsock backend");

    let pat = vsock_guest::pattern(0x5eed, PATTERN_LEN);
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("virtio_blk")
        .module("virtio_net")
        .module("vsock")
        .module("vmw_vsock_virtio_transport_common")
        .module("vmw_vsock_virtio_transport")
        .file("/pattern.bin", pat.clone(), 0o644)
        .file("/udhcpc.sh", UDHCPC_SCRIPT, 0o755)
        .file("/vsock-helper", std::fs::read(&helper).unwrap(), 0o755)
        .init_script(&init(http_port))
        .build(&initrd)
        .unwrap();

    let mut args = vec![
        "-chardev".to_string(),
        format!("socket,id=blk0,path={}", blk_sock.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=blk0,num-queues=1".into(),
    ];
    args.extend(vhost_user_net_args(&net_sock, &MAC));
    args.extend([
        "-chardev".to_string(),
        format!("socket,id=vs,path={}", vsock_sock.display()),
        "-device".into(),
        "vhost-user-vsock-pci,chardev=vs".into(),
    ]);
    let cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log")).arg(args);
    let started = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    if let Err(e) = vm.wait_for("VSOCK-LISTENING", Duration::from_secs(240)) {
        panic!("guest did not get through its checks: {e}");
    }
    // Host to guest over vsock, while the guest's other devices are set up and in use.
    if let Err(e) = echo_through_guest(&uds, GUEST_PORT, 31, HOST_TO_GUEST_BYTES) {
        panic!("host -> guest vsock echo failed: {e}\n{}", vm.output());
    }
    let out = vm.output();
    eprintln!(
        "{out}\nguest done after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !out.contains("KILN-ALL-FAIL"),
        "guest reported a failure:\n{out}"
    );
    assert!(
        out.contains("KILN-ALL-BLK-OK"),
        "disk pattern not read back:\n{out}"
    );
    assert!(
        out.contains("KILN-NET-LEASE ip=10.0.7."),
        "no DHCP lease from kiln-net:\n{out}"
    );
    assert!(
        out.contains(&format!("KILN-ALL-NET-SUM {want_sum}")),
        "file fetched through the NAT differs (want {want_sum}):\n{out}"
    );
    assert!(
        out.contains(&format!(
            "GUEST-CONNECT-OK seed=21 bytes={GUEST_TO_HOST_BYTES}"
        )),
        "guest -> host vsock echo:\n{out}"
    );
    assert_eq!(blk.connections(), 1);
    assert_eq!(nic.connections(), 1);
    assert_eq!(vsock.frontends(), 1);

    // The guest's writes were flushed (conv=fsync); QEMU goes, then the backends.
    drop(vm);
    blk.stop();
    blk.join().unwrap();
    nic.stop();
    nic.join().unwrap();
    vsock.stop();
    vsock.join().unwrap();
    disk.flush().unwrap();
    drop(disk);
    let data = checked_contents(&img, dir.path()).unwrap();
    assert_eq!(data.len() as u64, DISK_MIB << 20);
    assert!(data[..PATTERN_OFFSET].iter().all(|b| *b == 0));
    assert!(
        data[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN] == pat[..],
        "pattern differs on the host"
    );
    assert!(data[PATTERN_OFFSET + PATTERN_LEN..].iter().all(|b| *b == 0));
}
