//! Guest-visible network throughput: kiln's vhost-user-net (kiln-net's switch, DHCP and NAT
//! behind it) against QEMU's own user-mode network (`-netdev user`, libslirp's NAT) with
//! QEMU's virtio-net, same guest kernel, same server, same file, same run.
//!
//! `cargo bench -p kiln-vmm --bench net_bench [-- ROUNDS [MIB]]`
//!
//! The host serves MIB MiB (default 32) over HTTP on 127.0.0.1; the guest (Debian cloud
//! kernel under TCG, 1 vCPU, busybox) takes a DHCP lease and fetches the file with `wget` to
//! /dev/null through its NAT to the host alias 10.0.2.2, timed by the guest's /proc/uptime.
//! Both NATs carry the guest's TCP to a host socket, so both sides pay a user-space TCP
//! stack; the virtio-net device is the one difference in the guest. Each round runs the two
//! sides back to back, alternating which goes first; the median of per-round ratios is
//! printed (the machine is shared and noisy). Traffic stays on the host's loopback.

use std::path::Path;
use std::time::Duration;

use kiln_e2e::kernel::guest_kernel;
use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
use kiln_vmm::devices::net::vhost_user::spawn;

// The guest setup, shared with the real-driver net test.
#[path = "../tests/it/net_guest/mod.rs"]
mod net_guest;
use net_guest::{guest_nic, initramfs, mac_string, network, pattern, vhost_user_net_args, ALIAS};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x00, 0x02];

fn init(port: u16, bytes: usize) -> String {
    format!(
        r#"
ip link set lo up
ip link set eth0 up || echo "BENCH-FAIL no eth0"
udhcpc -i eth0 -n -q -t 10 -T 2 -s /udhcpc.sh >/dev/null 2>&1 || echo "BENCH-FAIL dhcp"
t0=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /dev/null http://{ALIAS}:{port}/file || echo "BENCH-FAIL wget"
t1=$(cut -d' ' -f1 /proc/uptime)
echo "BENCH-NET {bytes} $t0 $t1"
echo BENCH-DONE
poweroff -f
"#
    )
}

fn run_guest(kernel: &Path, initrd: &Path, log: &Path, args: Vec<String>) -> Option<f64> {
    let cfg = QemuConfig::new(kernel, initrd, log).arg(args);
    let mut vm = match Qemu::spawn(&cfg) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cannot start qemu: {e}");
            return None;
        }
    };
    if let Err(e) = vm.wait_for("BENCH-DONE", Duration::from_secs(600)) {
        eprintln!("guest did not finish: {e}\n{}", vm.output());
        return None;
    }
    let out = vm.output();
    vm.wait_exit(Duration::from_secs(20));
    if out.contains("BENCH-FAIL") {
        eprintln!("guest reported a failure:\n{out}");
        return None;
    }
    let line = out.lines().find(|l| l.contains("BENCH-NET "))?;
    let mut f = line
        .split("BENCH-NET ")
        .nth(1)?
        .split_whitespace()
        .map(|x| x.parse::<f64>().ok());
    let (b, t0, t1) = (f.next()??, f.next()??, f.next()??);
    (t1 > t0).then(|| b / (t1 - t0) / 1e6)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    // `cargo bench` passes `--bench`.
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
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
    let bytes = mib << 20;
    // The body is made once, so the server costs both sides the same.
    let port = kiln_e2e::http::Server::bytes(pattern(bytes)).port;
    let initrd = dir.path().join("initrd.cpio");
    initramfs(&kernel, &init(port, bytes), &initrd);
    let mac = mac_string(&MAC);
    println!(
        "guest wget of {mib} MiB from 127.0.0.1 through the NAT; TCG, 1 vCPU; load average {}",
        load_average()
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let kiln = || {
            let net = network("10.0.6.0/24");
            let nic = guest_nic(&net, MAC);
            let sock = dir.path().join(format!("net-{round}.sock"));
            let h = spawn(&sock, nic, MAC).expect("spawn backend");
            let r = run_guest(
                &kernel.vmlinuz,
                &initrd,
                &dir.path().join(format!("kiln-{round}.log")),
                vhost_user_net_args(&sock, &MAC),
            );
            h.stop();
            let _ = h.join();
            r
        };
        let qemu = || {
            run_guest(
                &kernel.vmlinuz,
                &initrd,
                &dir.path().join(format!("qemu-{round}.log")),
                vec![
                    "-netdev".into(),
                    "user,id=n0".into(),
                    "-device".into(),
                    // The same INTx interrupt as the kiln side, so only the backend differs.
                    format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
                ],
            )
        };
        let (k, q) = if round % 2 == 0 {
            let k = kiln();
            (k, qemu())
        } else {
            let q = qemu();
            (kiln(), q)
        };
        let (Some(k), Some(q)) = (k, q) else {
            println!("round {round}: a guest failed (see above); round left out");
            continue;
        };
        let r = k / q;
        ratios.push(r);
        println!(
            "round {round}  kiln vhost-user-net {k:7.1} MB/s   qemu user-net {q:7.1} MB/s   ratio {r:.2}   (load {})",
            load_average()
        );
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    if let Some(m) = ratios.get(ratios.len() / 2) {
        println!(
            "median ratio kiln/qemu over {} round(s): {m:.2}",
            ratios.len()
        );
    }
}
