//! Stand-in guests for the switch: Linux network namespaces plugged in through TAP ports.
//!
//! Every namespace is `kiln-test-<pid>-<n>` and is deleted on drop. Tests skip loudly where
//! namespaces cannot be made (not root, no `ip`, no busybox).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_net::{FramePort, Network, NicConfig, TapPort};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why namespace tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces and TAP devices need root".into());
    }
    for tool in ["ip", "busybox"] {
        let ok = Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    let probe = format!("kiln-test-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        return Some("`ip netns add` fails here".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(reason) = $crate::common::skip_reason() {
            kiln_e2e::skip(reason);
            return;
        }
    };
}

/// A namespace with one interface (`eth0` inside) plugged into a network.
pub struct Guest {
    pub ns: String,
    pub mac: [u8; 6],
    dir: tempfile::TempDir,
    children: Vec<std::process::Child>,
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

pub fn sh(args: &[&str]) -> Output {
    run(Command::new(args[0]).args(&args[1..]))
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Guest {
    /// Make a namespace, a TAP in it named eth0 with `mac`, attached to `net` as `vm`.
    pub fn new(
        net: &Network,
        vm: &str,
        subnet: &str,
        mac: [u8; 6],
        fixed: Option<Ipv4Addr>,
    ) -> Guest {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let ns = format!("kiln-test-{}-{n}", std::process::id());
        let tap_name = format!("kt{}x{n}", std::process::id() % 100000);
        must(&["ip", "netns", "add", &ns]);
        let g = Guest {
            ns: ns.clone(),
            mac,
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        };
        let tap = TapPort::open(&tap_name).expect("open TAP");
        must(&["ip", "link", "set", &tap_name, "netns", &ns]);
        let macs = mac_str(&mac);
        g.exec_ok(&["ip", "link", "set", &tap_name, "name", "eth0"]);
        g.exec_ok(&["ip", "link", "set", "eth0", "address", &macs]);
        g.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        g.exec_ok(&["ip", "link", "set", "lo", "up"]);
        let port: Arc<dyn FramePort> = Arc::new(tap);
        net.attach_port(
            NicConfig {
                vm_name: vm.into(),
                subnet: subnet.into(),
                mac,
                fixed_ip: fixed,
            },
            port,
        )
        .expect("attach");
        g
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args))
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "in {}: {args:?} failed ({}): {}{}",
            self.ns,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run in the background until the guest is dropped.
    pub fn spawn(&mut self, args: &[&str]) {
        let c = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        self.children.push(c);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Get a lease with busybox udhcpc; returns (ip, router, dns, hostname).
    pub fn dhcp(&self) -> (String, String, String, String) {
        let script = self.path("udhcpc.sh");
        let result = self.path("lease");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$1\" in bound|renew)\n ip addr flush dev $interface\n ip addr add $ip/$mask dev $interface\n [ -n \"$router\" ] && ip route add default via $router\n echo \"$ip $router $dns $hostname\" > {}\n;; esac\nexit 0\n",
                result.display()
            ),
        )
        .expect("write script");
        must(&["chmod", "+x", script.to_str().unwrap_or_default()]);
        self.exec_ok(&[
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            script.to_str().unwrap_or_default(),
        ]);
        let text = std::fs::read_to_string(&result).expect("lease written");
        let mut w = text.split_whitespace().map(str::to_string);
        (
            w.next().unwrap_or_default(),
            w.next().unwrap_or_default(),
            w.next().unwrap_or_default(),
            w.next().unwrap_or_default(),
        )
    }

    /// HTTP GET with busybox nc (busybox wget crashes inside `ip netns exec` here).
    /// Returns the whole response (headers and body) or the error output.
    pub fn http_get(&self, host: &str, port: u16, path: &str) -> Result<String, String> {
        let cmd =
            format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {host} {port}");
        let o = self.exec(&["busybox", "sh", "-c", &cmd]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && !out.is_empty() {
            Ok(out)
        } else {
            Err(format!(
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    }

    /// Configure a static address and default route (unmanaged subnets, no DHCP).
    pub fn static_ip(&self, cidr: &str, gw: &str) {
        self.exec_ok(&["ip", "addr", "add", cidr, "dev", "eth0"]);
        self.exec_ok(&["ip", "route", "add", "default", "via", gw]);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}
