//! Guest-visible block throughput: kiln's vhost-user-blk (kiln's qcow2 behind it) against
//! QEMU's own virtio-blk on the same kind of qcow2, in the same guest at the same time.
//!
//! `cargo bench -p kiln-vmm --bench blk_bench [-- ROUNDS [qcow2|raw]]`
//!
//! Each round boots the Debian cloud kernel under TCG once with two disks, each a fresh copy
//! of one empty 1 GiB image: one served by kiln's vhost-user-blk backend (serial `kiln`), the
//! other by QEMU's `-drive ...,format=qcow2 -device virtio-blk-pci` (serial `qemu`). The guest
//! runs every phase as a series of slices, one `dd` each, alternating between the two disks
//! (kiln, qemu, then qemu, kiln, ...), and times each slice. So both sides see the same guest,
//! the same moment's host load and the same guest commands: the machine is shared and noisy,
//! and two separate boots made back to back differed by up to 2x from load alone.
//!
//! Phases, per disk:
//! - `write-alloc`: fill the whole disk, 32 slices of `dd bs=1M count=32 oflag=direct
//!   conv=fsync` (one FLUSH per 32 MiB); every cluster is new, so qcow2 allocates as it goes;
//! - `write-over`: the same again over the now-allocated clusters;
//! - `read-1M`: read the disk twice, 8 slices of 256 MiB with `dd bs=1M iflag=direct` (one
//!   dd, one block at a time; the guest splits a 1 MiB block into two requests when its
//!   pages need more than SEG_MAX = 254 segments);
//! - `read-par`: the same, but each slice is four dd of 64 MiB at once (requests in flight
//!   together);
//! - `read-4k`: 16 slices of 1024 reads with `bs=4k iflag=direct`: the per-request cost.
//!
//! The guest clock is `/proc/timer_list`'s "now at N nsecs" (nanoseconds; /proc/uptime, 10 ms,
//! if the kernel lacks it). The guest prints both disks' queue limits and
//! `/sys/block/vdX/stat`, so both sides can be checked for the same request sizes and flushes.
//!
//! Prints MB/s per side, phase and round; per phase the median of the per-round kiln/QEMU
//! ratios and the ratio of the totals (all bytes over all time, per side); and the same for
//! the whole workload (all phases' time per side: QEMU's over kiln's). Rounds alternate
//! which disk comes first on the PCI bus and in the first slice.
//!
//! Both sides use the host page cache with flushes made durable (QEMU `cache=writeback`, its
//! default, `aio=threads`; kiln opens the image without O_DIRECT and fsyncs on FLUSH), one
//! request queue of 256 entries, MSI-X, the same image format and the same guest commands.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_disk::{BlockDevice, OpenOptions};
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_vmm::devices::block::vhost_user::spawn;
use kiln_vmm::devices::block::BlockOptions;

const DISK_MIB: usize = 1024;
const CHUNK_MIB: usize = 32;

/// The timed phases, in the order the guest runs them.
const PHASES: [&str; 5] = [
    "write-alloc",
    "write-over",
    "read-1M",
    "read-par",
    "read-4k",
];
const SIDES: [&str; 2] = ["kiln", "qemu"];

/// The guest's `/init` body (after `DISK=`, `CHUNK=` and `FIRST=` lines). `now` prints the
/// guest clock; each slice prints `BENCH <phase> <side> <bytes> <start> <end>`.
const INIT: &str = r#"
if grep -q '^now at' /proc/timer_list 2>/dev/null; then
  now() { grep -m1 '^now at' /proc/timer_list | cut -d' ' -f3; }
  echo "BENCH-UNIT ns"
else
  now() { cut -d' ' -f1 /proc/uptime; }
  echo "BENCH-UNIT s"
fi
for d in /sys/block/vd*; do
  case "$(cat $d/serial)" in
    kiln) kiln=/dev/${d##*/} ;;
    qemu) qemu=/dev/${d##*/} ;;
  esac
  q=$d/queue
  echo "BENCH-QUEUE $(cat $d/serial) ${d##*/} max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size) nr_requests=$(cat $q/nr_requests) write_cache=$(cat $q/write_cache)"
done
[ -n "$kiln" ] && [ -n "$qemu" ] || echo "BENCH-FAIL disks kiln=$kiln qemu=$qemu"
# slice PHASE INDEX BYTES CMD...: run CMD (with $dev set) on both disks, alternating order.
slice() {
  phase=$1; idx=$2; bytes=$3; shift 3
  if [ $(((idx + FIRST) % 2)) -eq 0 ]; then order="kiln qemu"; else order="qemu kiln"; fi
  for side in $order; do
    eval dev=\$$side
    t0=$(now)
    eval "$@" || echo "BENCH-FAIL $phase $side $idx"
    t1=$(now)
    echo "BENCH $phase $side $bytes $t0 $t1"
  done
}
dstat() {
  for side in kiln qemu; do
    eval dev=\$$side
    echo "BENCH-STAT $1 $side $(cat /sys/block/${dev#/dev/}/stat)"
    v=$(basename $(readlink /sys/block/${dev#/dev/}/device))
    echo "BENCH-IRQ $1 $side $(grep "$v-req" /proc/interrupts | tr -s ' ')"
  done
}
for phase in write-alloc write-over; do
  i=0
  while [ $i -lt $((DISK / CHUNK)) ]; do
    slice $phase $i $((CHUNK << 20)) 'dd if=/chunk of=$dev bs=1M seek=$((i * CHUNK)) oflag=direct conv=fsync 2>/dev/null'
    i=$((i + 1))
  done
  dstat $phase
done
i=0
while [ $i -lt 8 ]; do
  slice read-1M $i $((DISK << 18)) 'dd if=$dev of=/dev/null bs=1M skip=$((i % 4 * DISK / 4)) count=$((DISK / 4)) iflag=direct 2>/dev/null'
  i=$((i + 1))
done
dstat read-1M
par() {
  for k in 0 1 2 3; do
    dd if=$dev of=/dev/null bs=1M skip=$(((i % 4 * 4 + k) * DISK / 16)) count=$((DISK / 16)) iflag=direct 2>/dev/null || echo "BENCH-FAIL read-par" &
  done
  wait
}
i=0
while [ $i -lt 8 ]; do
  slice read-par $i $((DISK << 18)) par
  i=$((i + 1))
done
dstat read-par
i=0
while [ $i -lt 16 ]; do
  slice read-4k $i $((4 << 20)) 'dd if=$dev of=/dev/null bs=4k skip=$((i * 1024)) count=1024 iflag=direct 2>/dev/null'
  i=$((i + 1))
done
dstat read-4k
echo BENCH-DONE
poweroff -f
"#;

/// One round's result: (bytes, seconds) per side and phase, and the diagnostic lines.
struct Run {
    totals: [[(f64, f64); PHASES.len()]; 2],
    info: Vec<String>,
}

fn parse(out: &str) -> Run {
    assert!(!out.contains("BENCH-FAIL"), "guest I/O failed:\n{out}");
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    let unit = lines
        .iter()
        .find_map(|l| l.split("BENCH-UNIT ").nth(1))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no BENCH-UNIT line in the guest output:\n{out}"));
    let scale = if unit == "ns" { 1e-9 } else { 1.0 };
    let mut totals = [[(0.0, 0.0); PHASES.len()]; 2];
    let mut slices = 0;
    for l in &lines {
        let Some(rest) = l.split("BENCH ").nth(1) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let [phase, side, bytes, t0, t1] = f[..] else {
            panic!("bad line {l}");
        };
        let p = PHASES.iter().position(|x| *x == phase);
        let s = SIDES.iter().position(|x| *x == side);
        let num = |x: &str| x.parse::<f64>().unwrap_or_else(|_| panic!("bad line {l}"));
        let (Some(p), Some(s)) = (p, s) else {
            panic!("bad line {l}");
        };
        totals[s][p].0 += num(bytes);
        totals[s][p].1 += (num(t1) - num(t0)) * scale;
        slices += 1;
    }
    // 32 + 32 write slices, 8 + 8 read slices and 16 small-read slices per side.
    assert_eq!(
        slices,
        2 * (2 * DISK_MIB / CHUNK_MIB + 32),
        "slices missing:\n{out}"
    );
    let info = lines
        .iter()
        .filter(|l| {
            l.contains("BENCH-QUEUE") || l.contains("BENCH-STAT") || l.contains("BENCH-IRQ")
        })
        .map(|l| l.trim().to_string())
        .collect();
    Run { totals, info }
}

fn main() {
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    // `raw` separates the device path from the image format: both sides on a raw file.
    let format = args.get(2).cloned().unwrap_or_else(|| "qcow2".into());
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
        .arg(format!("{DISK_MIB}M"))
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

    println!(
        "guest dd on two {DISK_MIB} MiB {format} disks in one guest (kiln vhost-user-blk and \
         qemu virtio-blk, slices alternating); TCG, 1 vCPU; host page cache on both sides \
         (qemu cache=writeback,aio=threads), 1 queue of 256; load average {}",
        load_average()
    );
    let mbs = |(b, s): (f64, f64)| if s > 0.0 { b / s / 1e6 } else { 0.0 };
    let mut results: Vec<Run> = Vec::new();
    for round in 0..rounds {
        let first = round % 2;
        let initrd = dir.path().join(format!("initrd-{first}.cpio"));
        if !initrd.exists() {
            Initramfs::new()
                .busybox()
                .kernel(&kernel)
                .module("virtio_pci")
                .module("virtio_blk")
                .file("/chunk", chunk.clone(), 0o644)
                .init_script(&format!(
                    "DISK={DISK_MIB}\nCHUNK={CHUNK_MIB}\nFIRST={first}\n{INIT}"
                ))
                .build(&initrd)
                .expect("initramfs");
        }
        let kiln_img = dir.path().join(format!("kiln-{round}.{format}"));
        let qemu_img = dir.path().join(format!("qemu-{round}.{format}"));
        std::fs::copy(&base, &kiln_img).expect("copy image");
        std::fs::copy(&base, &qemu_img).expect("copy image");
        let disk: Arc<dyn BlockDevice> = kiln_disk::open(
            &kiln_img,
            OpenOptions {
                read_only: false,
                ..OpenOptions::default()
            },
        )
        .expect("open image");
        let sock = dir.path().join(format!("blk-{round}.sock"));
        let opts = BlockOptions {
            serial: "kiln".into(),
            ..BlockOptions::default()
        };
        let h = spawn(&sock, disk, opts).expect("spawn backend");
        let kiln_dev = vec![
            "-chardev".to_string(),
            format!("socket,id=blk0,path={}", sock.display()),
            "-device".into(),
            // QEMU's vhost-user-blk defaults to 128 entries; virtio-blk to 256.
            "vhost-user-blk-pci,chardev=blk0,num-queues=1,queue-size=256".into(),
        ];
        let qemu_dev = vec![
            "-drive".to_string(),
            format!(
                "file={},if=none,id=d0,format={format},cache=writeback,aio=threads",
                qemu_img.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=d0,num-queues=1,queue-size=256,serial=qemu".into(),
        ];
        let args = if first == 0 {
            [kiln_dev, qemu_dev].concat()
        } else {
            [qemu_dev, kiln_dev].concat()
        };
        let cfg = QemuConfig::new(
            &kernel.vmlinuz,
            &initrd,
            &dir.path().join(format!("round-{round}.log")),
        )
        .arg(args);
        let mut vm = Qemu::spawn(&cfg).expect("start qemu");
        if let Err(e) = vm.wait_for("BENCH-DONE", Duration::from_secs(1800)) {
            panic!("round {round}: {e}");
        }
        let out = vm.output();
        vm.wait_exit(Duration::from_secs(20));
        drop(vm);
        h.stop();
        let _ = h.join();
        let _ = std::fs::remove_file(&kiln_img);
        let _ = std::fs::remove_file(&qemu_img);
        let run = parse(&out);
        if round == 0 {
            for l in &run.info {
                println!("  {l}");
            }
        }
        let load = load_average();
        for (i, phase) in PHASES.iter().enumerate() {
            let (k, q) = (run.totals[0][i], run.totals[1][i]);
            println!(
                "round {round} {phase:11} kiln {:8.1} MB/s ({:5.2} s)   qemu {:8.1} MB/s ({:5.2} s)   ratio {:.2}   (load {load})",
                mbs(k),
                k.1,
                mbs(q),
                q.1,
                mbs(k) / mbs(q)
            );
        }
        results.push(run);
    }
    println!("summary over {rounds} round(s), kiln/qemu (>1: kiln faster):");
    for (i, phase) in PHASES.iter().enumerate() {
        let mut ratios: Vec<f64> = results
            .iter()
            .map(|r| mbs(r.totals[0][i]) / mbs(r.totals[1][i]))
            .collect();
        ratios.sort_by(|a, b| a.total_cmp(b));
        let total = |side: usize| {
            results.iter().fold((0.0, 0.0), |(b, s), r| {
                (b + r.totals[side][i].0, s + r.totals[side][i].1)
            })
        };
        let (kt, qt) = (mbs(total(0)), mbs(total(1)));
        let sorted: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{phase:11} median ratio {:.2}   ratio of totals {:.2} (kiln {kt:.1} MB/s, qemu {qt:.1} MB/s)   sorted: {}",
            ratios[ratios.len() / 2],
            kt / qt,
            sorted.join(" ")
        );
    }
    // The whole guest workload: every phase's time summed per side. The same bytes move on
    // both sides, so the ratio of times is the ratio of throughputs.
    let secs = |r: &Run, side: usize| r.totals[side].iter().map(|p| p.1).sum::<f64>();
    let mut whole: Vec<f64> = results.iter().map(|r| secs(r, 1) / secs(r, 0)).collect();
    whole.sort_by(|a, b| a.total_cmp(b));
    let (k, q): (f64, f64) = results
        .iter()
        .fold((0.0, 0.0), |(k, q), r| (k + secs(r, 0), q + secs(r, 1)));
    let sorted: Vec<String> = whole.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "all phases  median ratio {:.2}   ratio of totals {:.2} (kiln {k:.1} s, qemu {q:.1} s for the same I/O)   sorted: {}",
        whole[whole.len() / 2],
        q / k,
        sorted.join(" ")
    );
    println!("load average at the end {}", load_average());
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
