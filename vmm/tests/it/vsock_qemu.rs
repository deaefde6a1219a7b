//! Real Linux vsock driver against kiln's vhost-user-vsock backend: the Debian cloud kernel
//! boots under `qemu-system-x86_64 -accel tcg` with a busybox initramfs and a small static
//! vsock program (tests/it/vsock_guest/helper.rs, built here with rustc).
//!
//! Checked: host -> guest through the Firecracker-style handshake (`CONNECT 1024\n`,
//! `OK <port>\n`) with several multi-MiB echo transfers at once, compared byte for byte;
//! guest -> host (guest connects to CID 2 port 5000, reaching the listener at
//! `<uds>_5000`); a CONNECT to a port nobody listens on fails promptly without `OK`; and a
//! driver reset in the guest (PCI remove + rescan) closes the host's open connection and the
//! device serves again afterwards. Skips loudly where qemu, rustc or the kernel package
//! cannot be had.

use crate::vsock_guest;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;
use kiln_vmm::devices::vsock::vhost_user::spawn;

use crate::vsock_guest::{build_helper, host_connect, host_echo_listener};

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 5000;
const HOST_TO_GUEST_BYTES: usize = 4 << 20;
const GUEST_TO_HOST_BYTES: usize = 2 << 20;

const INIT: &str = r#"
echo "kiln-vsock: up"
/vsock-helper listen 1024 &
LISTENER=$!
# Guest -> host: three connections at once to the host listener at <uds>_5000.
for seed in 11 12 13; do /vsock-helper connect 2 5000 2097152 $seed & done
wait %2 %3 %4 2>/dev/null
sleep 1
echo "KILN-VSOCK-GUEST-DONE"
# Give the host time to open an idle connection, then reset the driver under it.
sleep 6
for v in /sys/bus/virtio/devices/*; do
  if [ "$(cat $v/device)" = "0x0013" ]; then PCI=$(readlink -f $v/..); fi
done
echo "kiln-vsock: resetting $PCI"
echo 1 > $PCI/remove
echo "KILN-VSOCK-REMOVED"
sleep 1
echo 1 > /sys/bus/pci/rescan
sleep 1
kill $LISTENER
/vsock-helper listen 1024 &
sleep 600
"#;

fn echo_through_guest(uds: &std::path::Path, seed: u64, len: usize) -> Result<(), String> {
    vsock_guest::echo_through_guest(uds, GUEST_PORT, seed, len)
}

fn count(out: &str, marker: &str) -> usize {
    out.lines().filter(|l| l.contains(marker)).count()
}

fn wait_count(vm: &mut Qemu, marker: &str, n: usize, timeout: Duration) {
    let start = Instant::now();
    while count(&vm.output(), marker) < n {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {n}x {marker}:\n{}",
            vm.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn linux_vsock_over_kiln_vhost_user() {
    if !qemu_available() {
        return skip("qemu-system-x86_64 is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let helper = dir.path().join("vsock-helper");
    if let Err(e) = build_helper(&helper) {
        return skip(format!("cannot build the static guest helper: {e}"));
    }
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("vsock")
        .module("vmw_vsock_virtio_transport_common")
        .module("vmw_vsock_virtio_transport")
        .file(
            "/vsock-helper",
            std::fs::read(&helper).expect("helper"),
            0o755,
        )
        .init_script(INIT)
        .build(&initrd)
        .expect("initramfs");

    let sock = dir.path().join("vsock.vhost");
    let uds = dir.path().join("vsock.sock");
    let _host_listener = host_echo_listener(
        kiln_vmm::devices::vsock::muxer::unix::guest_port_path(&uds, HOST_PORT),
    );
    let handle = spawn(&sock, &uds, GUEST_CID).expect("spawn vsock backend");

    let cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log")).arg([
        "-chardev".to_string(),
        format!("socket,id=vs,path={}", sock.display()),
        "-device".to_string(),
        "vhost-user-vsock-pci,chardev=vs".to_string(),
    ]);
    let started = Instant::now();
    let mut vm = Qemu::spawn(&cfg).expect("qemu");
    if let Err(e) = vm.wait_for("VSOCK-LISTENING", Duration::from_secs(120)) {
        panic!("guest did not come up: {e}");
    }
    eprintln!(
        "guest listening after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Nobody listens on 1025: the CONNECT fails promptly with a closed stream, no OK.
    let t = Instant::now();
    let (_, port) = host_connect(&uds, GUEST_PORT + 1).expect("connect");
    assert_eq!(port, None, "CONNECT to a closed guest port must not get OK");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        t.elapsed()
    );

    // Host -> guest: three multi-MiB echoes at once.
    let t = Instant::now();
    let workers: Vec<_> = (1..=3u64)
        .map(|seed| {
            let uds = uds.clone();
            std::thread::spawn(move || echo_through_guest(&uds, seed, HOST_TO_GUEST_BYTES))
        })
        .collect();
    for w in workers {
        if let Err(e) = w.join().expect("worker") {
            panic!("host -> guest echo failed: {e}\n{}", vm.output());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "host -> guest: 3 x {} MiB echoed in {secs:.1} s ({:.1} MiB/s each way, TCG guest)",
        HOST_TO_GUEST_BYTES >> 20,
        3.0 * (HOST_TO_GUEST_BYTES >> 20) as f64 / secs
    );

    // Guest -> host: the guest's three connections to CID 2 port 5000.
    if let Err(e) = vm.wait_for("KILN-VSOCK-GUEST-DONE", Duration::from_secs(120)) {
        panic!("guest connections did not finish: {e}");
    }
    let out = vm.output();
    assert_eq!(
        count(&out, "GUEST-CONNECT-OK"),
        3,
        "guest -> host echoes:\n{out}"
    );
    assert!(
        !out.contains("GUEST-CONNECT-FAIL") && !out.contains("GUEST-FAIL"),
        "{out}"
    );
    assert!(out.contains(&format!("bytes={GUEST_TO_HOST_BYTES}")));

    // A driver reset closes the host's open connection; the device serves again afterwards.
    let (mut idle, port) = host_connect(&uds, GUEST_PORT).expect("idle connect");
    assert!(port.is_some(), "idle connection refused");
    idle.write_all(b"ping").expect("ping");
    let mut pong = [0u8; 4];
    idle.read_exact(&mut pong).expect("pong");
    assert_eq!(&pong, b"ping");
    vm.wait_for("KILN-VSOCK-REMOVED", Duration::from_secs(60))
        .expect("guest reset its driver");
    let t = Instant::now();
    let mut rest = Vec::new();
    match idle.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("idle connection not closed by the reset: {e}"),
    }
    eprintln!(
        "idle connection closed {:?} after the reset marker",
        t.elapsed()
    );
    wait_count(&mut vm, "VSOCK-LISTENING", 2, Duration::from_secs(60));
    let mut ok = false;
    for _ in 0..20 {
        if echo_through_guest(&uds, 99, 64 * 1024).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        ok,
        "device did not serve after the driver reset:\n{}",
        vm.output()
    );
    eprintln!("first guest run {:.1} s", started.elapsed().as_secs_f64());

    // QEMU exits with a connection open: the host sees it closed, and a new QEMU on the same
    // vhost-user socket gets a working device.
    let (mut idle, port) = host_connect(&uds, GUEST_PORT).expect("idle connect");
    assert!(port.is_some(), "idle connection refused");
    drop(vm);
    let mut rest = Vec::new();
    match idle.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connection not closed when QEMU exited: {e}"),
    }
    let cfg2 = QemuConfig {
        serial_log: dir.path().join("serial2.log"),
        ..cfg
    };
    let mut vm2 = Qemu::spawn(&cfg2).expect("second qemu");
    if let Err(e) = vm2.wait_for("VSOCK-LISTENING", Duration::from_secs(120)) {
        panic!("second guest did not come up: {e}");
    }
    if let Err(e) = echo_through_guest(&uds, 7, 1 << 20) {
        panic!("second QEMU: echo failed: {e}\n{}", vm2.output());
    }
    assert_eq!(handle.frontends(), 2, "one vhost-user connection per QEMU");
    drop(vm2);
    handle.stop();
    handle.join().expect("backend stops cleanly");
}
