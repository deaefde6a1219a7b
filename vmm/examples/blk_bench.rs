//! Guest-visible block throughput: kiln's vhost-user-blk (kiln's qcow2 behind it) against
//! QEMU's own virtio-blk on the same qcow2, same guest kernel, same run.
//!
//! `cargo run --release -p kiln-vmm --example blk_bench [-- ROUNDS [qcow2|raw]]`
//!
//! Each round boots the Debian cloud kernel under TCG twice on a fresh copy of one qcow2:
//! once with kiln's backend, once with `-drive ...,format=qcow2 -device virtio-blk-pci`. The
//! guest writes 64 MiB with `dd oflag=direct` (fsync after each 16 MiB) and reads it back
//! four times with `iflag=direct`, timed by the guest. Prints MB/s per side and round, and
//! the median of the per-round kiln/QEMU ratios (the machine is shared and noisy: a round
//! compares two runs made back to back, and alternates which side goes first).
//!
//! Both sides use the host page cache with flushes made durable (QEMU `cache=writeback`, its
//! default, `aio=threads`; kiln opens the image without O_DIRECT and fsyncs on FLUSH), one
//! request queue of 256 entries, MSI-X, the same image format and the same guest commands.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_disk::{BlockDevice, OpenOptions};
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_vmm::devices::block::vhost_user::spawn;
use kiln_vmm::devices::block::BlockOptions;

const CHUNK_MIB: usize = 16;
const CHUNKS: usize = 4;

/// busybox dd in Debian prints no timing, so the guest times itself with /proc/uptime
/// (10 ms resolution; each pass takes seconds under TCG).
const INIT: &str = r#"
t0=$(cut -d' ' -f1 /proc/uptime)
for i in 0 1 2 3; do
  dd if=/chunk of=/dev/vda bs=1M seek=$((i * 16)) oflag=direct conv=fsync 2>/dev/null || echo "BENCH-FAIL write"
done
t1=$(cut -d' ' -f1 /proc/uptime)
for i in 0 1 2 3; do
  dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null || echo "BENCH-FAIL read"
done
t2=$(cut -d' ' -f1 /proc/uptime)
echo "BENCH-WRITE 67108864 $t0 $t1"
echo "BENCH-READ 268435456 $t1 $t2"
echo BENCH-DONE
poweroff -f
"#;

/// (bytes, seconds) from the line tagged `tag`: "<tag> <bytes> <start> <end>".
fn sum(out: &str, tag: &str) -> Option<(f64, f64)> {
    let l = out.lines().find(|l| l.contains(tag))?;
    let mut f = l
        .split(tag)
        .nth(1)?
        .split_whitespace()
        .map(|x| x.parse::<f64>().ok());
    let (b, t0, t1) = (f.next()??, f.next()??, f.next()??);
    Some((b, t1 - t0))
}

fn run_guest(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    name: &str,
    args: Vec<String>,
) -> Result<String, String> {
    let cfg = QemuConfig::new(kernel, initrd, &dir.join(format!("{name}.log"))).arg(args);
    let mut vm = Qemu::spawn(&cfg).map_err(|e| e.to_string())?;
    vm.wait_for("BENCH-DONE", Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    let out = vm.output();
    vm.wait_exit(Duration::from_secs(20));
    Ok(out)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    // `raw` separates the device path from the image format: both sides on a raw file.
    let format = std::env::args().nth(2).unwrap_or_else(|| "qcow2".into());
    if format != "qcow2" && format != "raw" {
        eprintln!("usage: blk_bench [ROUNDS] [qcow2|raw]");
        std::process::exit(2);
    }
    if !qemu_available() {
        eprintln!("SKIP: qemu-system-x86_64 is not installed");
        return;
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: cannot get the Debian cloud kernel: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join(format!("base.{format}"));
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", &format])
        .arg(&base)
        .arg("256M")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: qemu-img create failed");
        return;
    }
    let mut s = 0x1234_5678_9abc_def1u64;
    let chunk: Vec<u8> = (0..CHUNK_MIB << 20)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("virtio_pci")
        .module("virtio_blk")
        .file("/chunk", chunk, 0o644)
        .init_script(INIT)
        .build(&initrd)
        .expect("initramfs");

    let mbs = |(b, s): (f64, f64)| if s > 0.0 { b / s / 1e6 } else { 0.0 };
    println!(
        "guest dd on {format}: write {} MiB, read {} MiB per pass; TCG, 1 vCPU; host page \
         cache on both sides (qemu cache=writeback), 1 queue of 256; load average {}",
        CHUNK_MIB * CHUNKS,
        CHUNK_MIB * CHUNKS * 4,
        load_average()
    );
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let kiln = || {
            // kiln: vhost-user-blk over kiln's block layer.
            let img = dir.path().join(format!("kiln-{round}.{format}"));
            std::fs::copy(&base, &img).expect("copy image");
            let disk: Arc<dyn BlockDevice> = kiln_disk::open(
                &img,
                OpenOptions {
                    read_only: false,
                    ..OpenOptions::default()
                },
            )
            .expect("open image");
            let sock = dir.path().join(format!("blk-{round}.sock"));
            let h = spawn(&sock, disk, BlockOptions::default()).expect("spawn backend");
            let out = run_guest(
                &kernel.vmlinuz,
                &initrd,
                dir.path(),
                &format!("kiln-{round}"),
                vec![
                    "-chardev".into(),
                    format!("socket,id=blk0,path={}", sock.display()),
                    "-device".into(),
                    // QEMU's vhost-user-blk defaults to 128 entries; virtio-blk to 256.
                    "vhost-user-blk-pci,chardev=blk0,num-queues=1,queue-size=256".into(),
                ],
            )
            .expect("kiln guest");
            h.stop();
            let _ = h.join();
            measure(&out, "kiln")
        };
        let qemu = || {
            // QEMU's own virtio-blk on a copy of the same image.
            let img = dir.path().join(format!("qemu-{round}.{format}"));
            std::fs::copy(&base, &img).expect("copy image");
            let out = run_guest(
                &kernel.vmlinuz,
                &initrd,
                dir.path(),
                &format!("qemu-{round}"),
                vec![
                    "-drive".into(),
                    format!(
                        "file={},if=none,id=d0,format={format},cache=writeback,aio=threads",
                        img.display()
                    ),
                    "-device".into(),
                    "virtio-blk-pci,drive=d0,num-queues=1,queue-size=256".into(),
                ],
            )
            .expect("qemu guest");
            measure(&out, "qemu")
        };
        let (kiln, qemu) = if round % 2 == 0 {
            let k = kiln();
            (k, qemu())
        } else {
            let q = qemu();
            (kiln(), q)
        };
        for (i, what) in ["write", "read"].iter().enumerate() {
            let (k, q) = (mbs(kiln[i]), mbs(qemu[i]));
            let r = if q > 0.0 { k / q } else { 0.0 };
            ratios[i].push(r);
            println!(
                "round {round} {what:5}  kiln vhost-user-blk {k:8.1} MB/s   qemu virtio-blk {q:8.1} MB/s   ratio {r:.2}   (load {})",
                load_average()
            );
        }
    }
    for (i, what) in ["write", "read"].iter().enumerate() {
        let v = &mut ratios[i];
        v.sort_by(|a, b| a.total_cmp(b));
        if let Some(m) = v.get(v.len() / 2) {
            let all: Vec<String> = v.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "median {what:5} ratio kiln/qemu over {rounds} round(s): {m:.2}   (sorted: {})",
                all.join(" ")
            );
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn measure(out: &str, who: &str) -> [(f64, f64); 2] {
    assert!(
        !out.contains("BENCH-FAIL"),
        "{who}: guest I/O failed:\n{out}"
    );
    let get = |tag: &str| {
        sum(out, tag).unwrap_or_else(|| panic!("{who}: no {tag}line in the guest output:\n{out}"))
    };
    [get("BENCH-WRITE "), get("BENCH-READ ")]
}
