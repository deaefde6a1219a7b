//! A NIC with a static `ip` on a subnet with `dhcp: false` and `dns`: kiln's agent configures
//! the address, the default route through the gateway and the subnet's DNS server in the
//! guest, in the build (the step prints them) and again at `kiln run` of a clone (read with
//! `kiln exec`). The VPC has no internet and everything runs with `--no-internet`: nothing
//! leaves the build's own user-space network (192.0.2.53 is never asked).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::build_common::*;

const MANIFEST: &str = r#"network:
  vpcs:
    - name: lab
      internet: false
  subnets:
    - name: fixed
      vpc: lab
      cidr: 10.30.0.0/24
      dhcp: false
      dns: "192.0.2.53"
vms:
  - name: fixed
    source:
      bootstrap:
        distro: debian
        suite: bookworm
    resources:
      cpu: 1
      memory: 512Mi
    disks:
      - name: root
        size: 4Gi
    nics:
      - name: eth0
        subnet: fixed
        ip: 10.30.0.7
    provisioners:
      - name: show
        type: shell
        shell:
          inline: |
            echo "addresses: $(hostname -I)"
            echo "--- route"; cat /proc/net/route
            echo "--- dns"; cat /etc/resolv.conf; resolvectl dns 2>&1 || true
            echo "--- end"
"#;

/// The part of `text` between `from` and `to`.
fn between<'a>(text: &'a str, from: &str, to: &str) -> &'a str {
    let a = text.find(from).map_or(text.len(), |i| i + from.len());
    let b = text[a..].find(to).map_or(text.len(), |i| a + i);
    &text[a..b]
}

#[test]
fn a_static_ip_without_dhcp_is_configured_in_the_build_and_in_a_clone() {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(reason) => {
            kiln_e2e::skip(reason);
            return;
        }
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("static-net.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    let out = run_kiln(
        &kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            m,
            "--no-internet",
        ],
    );
    assert!(out.status.success(), "kiln build failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10.30.0.7/24 handed to the guest (static)"),
        "the handover is announced"
    );
    let log = std::fs::read_to_string(modules.join("static-net/logs/fixed.log")).unwrap();
    let addrs = between(&log, "addresses:", "\n");
    assert!(
        addrs.split_whitespace().any(|a| a == "10.30.0.7"),
        "the static address: {log}"
    );
    // The default route through the gateway 10.30.0.1 (01001E0A in /proc/net/route).
    let route = between(&log, "--- route", "--- dns");
    assert!(
        route.lines().any(|l| l.contains("\t00000000\t01001E0A\t")),
        "a default route via 10.30.0.1: {route}"
    );
    let dns = between(&log, "--- dns", "--- end");
    assert!(dns.contains("192.0.2.53"), "the subnet's DNS server: {dns}");

    // A clone: `kiln run` configures the address again at its boot.
    let clones = tmp.path().join("clones");
    let c = clones.to_str().unwrap();
    let out = run_kiln(
        &kiln,
        &["clone", "static-net", "--modules", m, "--clones", c],
    );
    assert!(out.status.success());
    let run_dir = tmp.path().join("run");
    let run = Command::new(&kiln)
        .args(["run", "static-net-1", "--clones", c])
        .env("KILN_RUN_DIR", &run_dir)
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sock = run_dir.join("clones/static-net-1/fixed/vsock.sock");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = Command::new(&kiln)
        .args([
            "exec",
            "static-net-1/fixed",
            "--",
            "sh",
            "-c",
            "for i in $(seq 1 120); do \
               hostname -I | grep -qw 10.30.0.7 && break; sleep 1; \
             done; \
             echo \"addresses: $(hostname -I)\"; \
             echo '--- dns'; cat /etc/resolv.conf; resolvectl dns 2>&1; echo '--- end'",
        ])
        .env("KILN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status();
    let run_out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    eprintln!(
        "exec: {text}{}\nkiln run: {}",
        String::from_utf8_lossy(&shown.stderr),
        String::from_utf8_lossy(&run_out.stderr)
    );
    assert!(
        between(&text, "addresses:", "\n")
            .split_whitespace()
            .any(|a| a == "10.30.0.7"),
        "the clone's static address"
    );
    assert!(
        between(&text, "--- dns", "--- end").contains("192.0.2.53"),
        "the clone's DNS server"
    );
    eprintln!(
        "build_static_net took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
