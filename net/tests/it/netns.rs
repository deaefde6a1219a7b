//! The module network with network namespaces as guests (TAP ports). Root only; skips loudly
//! elsewhere. Traffic goes only to the namespaces made here and to the host's loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::common::Guest;
use crate::require_netns;
use kiln_net::{Network, NetworkConfig, SubnetConfig, VpcConfig};

fn subnet(name: &str, vpc: &str, cidr: &str) -> SubnetConfig {
    SubnetConfig {
        name: name.into(),
        vpc: vpc.into(),
        cidr: cidr.parse().expect("cidr"),
        dhcp: true,
        unmanaged: false,
        dns: Vec::new(),
    }
}

fn vpc(name: &str, internet: bool) -> VpcConfig {
    VpcConfig {
        name: name.into(),
        internet,
        host_access: false,
    }
}

const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

fn network() -> Network {
    Network::new(NetworkConfig {
        vpcs: vec![vpc("lab", false), vpc("other", false), vpc("web", true)],
        subnets: vec![
            subnet("front", "lab", "10.77.1.0/24"),
            subnet("back", "lab", "10.77.2.0/24"),
            subnet("iso", "other", "10.88.0.0/24"),
            subnet("pub", "web", "10.99.0.0/24"),
        ],
        host_loopback_alias: Some(ALIAS),
        ..NetworkConfig::default()
    })
    .expect("network")
}

/// A one-shot HTTP server on the host's loopback; returns its port.
fn loopback_http(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn dhcp_names_routing_and_isolation() {
    require_netns!();
    let net = network();
    let a = Guest::new(&net, "alpha", "front", [2, 0, 0, 0, 1, 1], None);
    let b = Guest::new(
        &net,
        "beta",
        "back",
        [2, 0, 0, 0, 1, 2],
        Some(Ipv4Addr::new(10, 77, 2, 50)),
    );
    let c = Guest::new(&net, "gamma", "iso", [2, 0, 0, 0, 1, 3], None);

    let (ip_a, router_a, dns_a, host_a) = a.dhcp();
    assert!(ip_a.starts_with("10.77.1."), "lease {ip_a}");
    assert_eq!(router_a, "10.77.1.1");
    assert_eq!(dns_a, "10.77.1.1");
    assert_eq!(host_a, "alpha");
    let (ip_b, _, _, host_b) = b.dhcp();
    assert_eq!(ip_b, "10.77.2.50", "fixed lease");
    assert_eq!(host_b, "beta");
    let (ip_c, _, _, _) = c.dhcp();
    assert!(ip_c.starts_with("10.88.0."));

    // The gateway answers pings; same VPC across subnets: ping and names.
    a.exec_ok(&["busybox", "ping", "-c", "1", "-W", "2", "10.77.1.1"]);
    a.exec_ok(&["busybox", "ping", "-c", "2", "-W", "2", &ip_b]);
    b.exec_ok(&["busybox", "ping", "-c", "1", "-W", "2", &ip_a]);
    let out = a.exec_ok(&["busybox", "nslookup", "beta", "10.77.1.1"]);
    assert!(out.contains("10.77.2.50"), "nslookup beta: {out}");
    let out = b.exec_ok(&["busybox", "nslookup", "alpha", "10.77.2.1"]);
    assert!(out.contains(&ip_a), "nslookup alpha: {out}");
    assert_eq!(
        net.resolve("alpha").expect("resolve"),
        vec![ip_a.parse::<Ipv4Addr>().expect("ip")]
    );

    // Another VPC: no path, and its DNS does not know the lab's names.
    let o = c.exec(&["busybox", "ping", "-c", "1", "-W", "2", &ip_a]);
    assert!(!o.status.success(), "other VPC reached lab");
    let o = c.exec(&["busybox", "nslookup", "alpha", "10.88.0.1"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(&ip_a),
        "other VPC resolved lab name"
    );
    let o = a.exec(&["busybox", "ping", "-c", "1", "-W", "2", &ip_c]);
    assert!(!o.status.success(), "lab reached other VPC");
}

#[test]
fn nat_reaches_loopback_and_no_internet_is_refused_at_once() {
    require_netns!();
    let net = network();
    let web = Guest::new(&net, "w", "pub", [2, 0, 0, 0, 2, 1], None);
    let lab = Guest::new(&net, "l", "front", [2, 0, 0, 0, 2, 2], None);
    web.dhcp();
    lab.dhcp();
    let port = loopback_http("hello through the NAT");
    let alias = ALIAS.to_string();
    let out = web
        .http_get(&alias, port, "/")
        .expect("fetch through the NAT");
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.ends_with("hello through the NAT"), "{out}");

    // ICMP echo through the NAT (a raw or ping socket on the host; root has one).
    web.exec_ok(&["busybox", "ping", "-c", "2", "-W", "3", &alias]);
    let o = lab.exec(&["busybox", "ping", "-c", "1", "-W", "2", &alias]);
    assert!(!o.status.success(), "ping left a VPC without internet");

    let t = Instant::now();
    let err = lab
        .http_get(&alias, port, "/")
        .expect_err("VPC without internet reached the host");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refusal took {:?}: {err}",
        t.elapsed(),
    );
    assert!(err.contains("refused"), "expected a refusal: {err}");
}

#[test]
fn port_forward_reaches_a_server_in_the_guest() {
    require_netns!();
    let net = network();
    let mut g = Guest::new(&net, "srv", "front", [2, 0, 0, 0, 3, 1], None);
    let (ip, _, _, _) = g.dhcp();
    let www = g.path("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    std::fs::write(www.join("index.html"), "served from the guest").expect("write");
    g.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        www.to_str().unwrap_or_default(),
    ]);
    let addr = net
        .add_port_forward(
            "127.0.0.1:0".parse::<SocketAddr>().expect("addr"),
            ip.parse().expect("ip"),
            8080,
        )
        .expect("forward");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let r = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        })();
        match r {
            Ok(r) if r.contains("200") => break r,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("forward failed: {other:?}"),
        }
    };
    assert!(body.ends_with("served from the guest"), "{body}");
}

#[test]
fn http_directory_is_served_at_the_gateway() {
    require_netns!();
    let net = network();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("preseed.cfg"), "d-i foo bar").expect("write");
    net.http_dir(dir.path(), 8088).expect("http dir");
    // A VPC without internet still reaches the build's own file server.
    let g = Guest::new(&net, "inst", "front", [2, 0, 0, 0, 4, 1], None);
    g.dhcp();
    let out = g
        .http_get("10.77.1.1", 8088, "/preseed.cfg")
        .expect("fetch");
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.ends_with("d-i foo bar"), "{out}");
}
