//! TCP throughput through kiln-net, from network namespaces (root only), against the same
//! transfer over a kernel veth pair in the same run:
//!
//! - guest -> host through the NAT (the guest sends to the host-loopback alias; a sink in
//!   this process on 127.0.0.1 counts the bytes),
//! - guest -> guest through the switch (two namespaces on one subnet),
//! - guest -> guest over a veth pair (the kernel baseline).
//!
//! `cargo bench -p kiln-net --bench throughput` (KILN_BENCH_MIB sets the transfer size, default
//! 64). Sender and sink are threads of this process that entered the namespaces (setns), so
//! no tool's buffering limits the numbers; traffic stays on loopback and in the
//! namespaces made here.

// The namespace guests of the integration tests, shared with them.
#[path = "../tests/it/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Guest;
use kiln_net::{Network, NetworkConfig, SubnetConfig, VpcConfig};

const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

struct Ns(String);
impl Ns {
    fn new(name: &str) -> Ns {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "ip netns add {name}");
        Ns(name.to_string())
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run in namespace")
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A byte sink listening on port 5001 inside the namespace `ns` (a thread that entered it);
/// returns (bytes, time from accept to EOF).
fn sink_in(ns: &str) -> std::thread::JoinHandle<(usize, Duration)> {
    let path = format!("/var/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let l = TcpListener::bind("0.0.0.0:5001").expect("bind in namespace");
        tx.send(()).expect("ready");
        count(&l)
    });
    rx.recv().expect("sink ready");
    h
}

fn count(l: &TcpListener) -> (usize, Duration) {
    let (mut c, _) = l.accept().expect("accept");
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0usize;
    let t = Instant::now();
    while let Ok(k) = c.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    (n, t.elapsed())
}

/// Run `f` on a thread that entered the network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Send `mib` MiB from inside `ns` to `dst:port` into `sink`; returns MB/s as the sink saw it.
fn transfer(
    ns: &str,
    sink: std::thread::JoinHandle<(usize, Duration)>,
    dst: &str,
    port: u16,
    mib: usize,
) -> f64 {
    let dst = format!("{dst}:{port}");
    in_netns(ns, move || {
        let mut c = std::net::TcpStream::connect(&dst).expect("connect");
        let buf = vec![0x5au8; 1 << 16];
        for _ in 0..mib * 16 {
            c.write_all(&buf).expect("send");
        }
    });
    let (n, d) = sink.join().expect("sink");
    assert_eq!(n, mib << 20, "sink got {n} bytes");
    (n as f64 / 1e6) / d.as_secs_f64()
}

fn main() {
    if let Some(reason) = common::skip_reason() {
        eprintln!("SKIP: {reason}");
        return;
    }
    let mib: usize = std::env::var("KILN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let net = Network::new(NetworkConfig {
        vpcs: vec![VpcConfig {
            name: "v".into(),
            internet: true,
            host_access: false,
        }],
        subnets: vec![SubnetConfig {
            name: "s".into(),
            vpc: "v".into(),
            cidr: "10.66.0.0/24".parse().expect("cidr"),
            dhcp: true,
            unmanaged: false,
            dns: Vec::new(),
        }],
        host_loopback_alias: Some(ALIAS),
        ..NetworkConfig::default()
    })
    .expect("network");
    let a = Guest::new(&net, "a", "s", [2, 0, 0, 0, 9, 1], None);
    let b = Guest::new(&net, "b", "s", [2, 0, 0, 0, 9, 2], None);
    a.dhcp();
    let (ip_b, _, _, _) = b.dhcp();

    // 1. guest -> host through the NAT.
    let sink = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = sink.local_addr().expect("addr").port();
    let counter = std::thread::spawn(move || count(&sink));
    let nat = transfer(&a.ns, counter, &ALIAS.to_string(), port, mib);

    // 2. guest -> guest through the switch.
    let switch = transfer(&a.ns, sink_in(&b.ns), &ip_b, 5001, mib);

    // 3. the same over a veth pair.
    let pid = std::process::id();
    let (na, nb) = (
        Ns::new(&format!("kiln-bench-{pid}-a")),
        Ns::new(&format!("kiln-bench-{pid}-b")),
    );
    let st = Command::new("ip")
        .args([
            "link", "add", "kbva", "netns", &na.0, "type", "veth", "peer", "name", "kbvb", "netns",
            &nb.0,
        ])
        .status()
        .expect("ip link add");
    assert!(st.success(), "veth pair");
    for (ns, dev, ip) in [
        (&na, "kbva", "10.250.0.1/24"),
        (&nb, "kbvb", "10.250.0.2/24"),
    ] {
        assert!(ns
            .exec(&["ip", "addr", "add", ip, "dev", dev])
            .status
            .success());
        assert!(ns.exec(&["ip", "link", "set", dev, "up"]).status.success());
        assert!(ns.exec(&["ip", "link", "set", "lo", "up"]).status.success());
    }
    let veth = transfer(&na.0, sink_in(&nb.0), "10.250.0.2", 5001, mib);

    println!(
        "kiln-net TCP throughput, {mib} MiB per transfer (a TCP stream from inside the namespace):"
    );
    println!(
        "  guest -> host via NAT      {nat:8.1} MB/s  ({:.2} x veth)",
        nat / veth
    );
    println!(
        "  guest -> guest via switch  {switch:8.1} MB/s  ({:.2} x veth)",
        switch / veth
    );
    println!("  veth pair (kernel)         {veth:8.1} MB/s");
}
