//! Real Linux driver against kiln's vhost-user-blk: the Debian cloud kernel boots under
//! `qemu-system-x86_64 -accel tcg` with a busybox initramfs; its virtio_blk driver writes a
//! pattern to /dev/vda (a qcow2 served by kiln's block layer), reads it back with direct I/O
//! and compares. The host then checks the qcow2 with `qemu-img check` and compares the
//! content. Skips loudly where qemu, qemu-img or the kernel package cannot be had.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_disk::{BlockDevice, OpenOptions};
use kiln_e2e::image::checked_contents;
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_e2e::skip;
use kiln_vmm::devices::block::vhost_user::spawn;
use kiln_vmm::devices::block::BlockOptions;

const DISK_MIB: u64 = 64;
/// The guest writes the pattern at this byte offset (dd bs=64k seek=16).
const PATTERN_OFFSET: usize = 1 << 20;
const PATTERN_LEN: usize = 1 << 20;
const SERIAL: &str = "kiln-blk-test";

fn pattern() -> Vec<u8> {
    kiln_e2e::pattern::pattern(0x9e37_79b9_7f4a_7c15, PATTERN_LEN)
}

const INIT: &str = r#"
echo "kiln-guest: up"
if [ ! -b /dev/vda ]; then echo "KILN-BLK-FAIL no /dev/vda"; echo KILN-BLK-DONE; poweroff -f; fi
echo "kiln-blk: size=$(cat /sys/block/vda/size) serial=$(cat /sys/block/vda/serial) ro=$(cat /sys/block/vda/ro)"
if dd if=/pattern.bin of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/tmp/dd.err; then :; else echo "KILN-BLK-FAIL write: $(cat /tmp/dd.err)"; fi
if dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=16 iflag=direct 2>/tmp/dd.err; then :; else echo "KILN-BLK-FAIL read: $(cat /tmp/dd.err)"; fi
if cmp /pattern.bin /tmp/back; then echo "KILN-BLK-OK"; else echo "KILN-BLK-FAIL compare"; fi
dd if=/pattern.bin of=/dev/vda bs=64k seek=64 count=4 oflag=direct conv=fsync 2>/dev/null
if blkdiscard -o 4194304 -l 131072 /dev/vda; then echo "kiln-blk: discard ok"; else echo "KILN-BLK-FAIL discard"; fi
sync
echo "KILN-BLK-DONE"
poweroff -f
"#;

/// The second QEMU: read back and compare what the first guest wrote, count the queues,
/// then reboot once inside the same QEMU (a build's reboot step does this) and check again
/// after the device was set up a second time on the same vhost-user connection. Sector 4096
/// (2 MiB) holds the reboot marker.
const INIT_VERIFY: &str = r#"
echo "kiln-blk: queues=$(ls /sys/block/vda/mq | wc -l)"
if dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=16 iflag=direct 2>/tmp/dd.err; then :; else echo "KILN-BLK-FAIL read: $(cat /tmp/dd.err)"; fi
if cmp /pattern.bin /tmp/back; then echo "KILN-BLK-OK"; else echo "KILN-BLK-FAIL compare"; fi
mark=$(dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 13)
if [ "$mark" = "kiln-rebooted" ]; then
  echo "KILN-BLK-AFTER-REBOOT"
  echo "KILN-BLK-DONE"
  poweroff -f
fi
echo kiln-rebooted | dd of=/dev/vda bs=512 seek=4096 conv=sync,fsync oflag=direct 2>/dev/null
echo "kiln-blk: rebooting"
reboot -f
"#;

/// Boot one guest against the vhost-user-blk socket with `queues` vCPUs and queues; return
/// its serial output once it has powered off.
fn boot(
    kernel: &Path,
    initrd: &Path,
    sock: &Path,
    dir: &Path,
    queues: u32,
    reboot: bool,
) -> String {
    let mut cfg = QemuConfig::new(kernel, initrd, &dir.join(format!("serial-{queues}.log"))).arg([
        "-chardev".to_string(),
        format!("socket,id=blk0,path={}", sock.display()),
        "-device".to_string(),
        format!("vhost-user-blk-pci,chardev=blk0,num-queues={queues}"),
    ]);
    cfg.cpus = queues;
    cfg.no_reboot = !reboot;
    let started = Instant::now();
    let mut vm = Qemu::spawn(&cfg).unwrap();
    if let Err(e) = vm.wait_for("KILN-BLK-DONE", Duration::from_secs(120)) {
        panic!("guest did not finish: {e}");
    }
    let out = vm.output();
    assert!(
        vm.wait_exit(Duration::from_secs(20)),
        "guest did not power off:\n{out}"
    );
    eprintln!(
        "{out}\nguest run took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out
}

fn tool_ok(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn linux_virtio_blk_over_kiln_vhost_user() {
    if !qemu_available() {
        return skip("qemu-system-x86_64 is not installed");
    }
    if !tool_ok("qemu-img") {
        return skip("qemu-img is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(format!("{DISK_MIB}M"))
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create failed");

    let pat = pattern();
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("virtio_blk")
        .file("/pattern.bin", pat.clone(), 0o644)
        .init_script(INIT)
        .build(&initrd)
        .unwrap();

    let disk: Arc<dyn BlockDevice> = kiln_disk::open(
        &img,
        OpenOptions {
            read_only: false,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let sock = dir.path().join("blk.sock");
    let handle = spawn(
        &sock,
        disk.clone(),
        BlockOptions {
            read_only: false,
            serial: SERIAL.into(),
            num_queues: 2,
        },
    )
    .unwrap();

    let out = boot(&kernel.vmlinuz, &initrd, &sock, dir.path(), 1, false);
    assert!(
        !out.contains("KILN-BLK-FAIL"),
        "guest reported a failure:\n{out}"
    );
    assert!(out.contains("KILN-BLK-OK"), "no success marker:\n{out}");
    assert!(
        out.contains(&format!("size={} serial={SERIAL} ro=0", DISK_MIB * 2048)),
        "wrong size/serial/ro seen by the guest:\n{out}"
    );
    assert!(out.contains("kiln-blk: discard ok"), "{out}");
    assert_eq!(handle.connections(), 1);

    // The same server takes the next frontend, as when QEMU restarts a rebooting guest; this
    // one runs two vCPUs on two queues and reads back what the first guest wrote.
    let initrd2 = dir.path().join("initrd2.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("virtio_blk")
        .file("/pattern.bin", pat.clone(), 0o644)
        .init_script(INIT_VERIFY)
        .build(&initrd2)
        .unwrap();
    let out = boot(&kernel.vmlinuz, &initrd2, &sock, dir.path(), 2, true);
    assert!(
        !out.contains("KILN-BLK-FAIL"),
        "second guest reported a failure:\n{out}"
    );
    assert!(
        out.contains("KILN-BLK-OK"),
        "no success marker from the second guest:\n{out}"
    );
    assert!(
        out.contains("queues=2"),
        "second guest does not see two queues:\n{out}"
    );
    assert_eq!(handle.connections(), 2);
    handle.stop();
    handle.join().unwrap();

    disk.flush().unwrap();
    drop(disk);
    check_image(&img, &pat, dir.path());
}

/// `qemu-img check`, then the content: the pattern where the guest wrote it, zeroes
/// where it wrote nothing.
fn check_image(img: &Path, pat: &[u8], dir: &Path) {
    let data = checked_contents(img, dir).unwrap();
    assert_eq!(data.len() as u64, DISK_MIB << 20);
    assert!(data[..PATTERN_OFFSET].iter().all(|b| *b == 0));
    let mark = PATTERN_OFFSET + PATTERN_LEN;
    assert_eq!(&data[mark..mark + 14], b"kiln-rebooted\n", "reboot marker");
    assert!(
        data[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN] == *pat,
        "pattern differs on the host"
    );
    // Second copy at 4 MiB: its first 128 KiB discarded by the guest (reads back as zeroes
    // or the old data: both are allowed), the rest kept.
    let second = 4 << 20;
    let cut = 128 << 10;
    let discarded = &data[second..second + cut];
    assert!(discarded.iter().all(|b| *b == 0) || discarded == &pat[..cut]);
    assert!(data[second + cut..second + (256 << 10)] == pat[cut..256 << 10]);
    assert!(data[second + (256 << 10)..].iter().all(|b| *b == 0));
}
