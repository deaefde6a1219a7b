//! The static agent inside a real Linux guest: the Debian cloud kernel under QEMU TCG with
//! a busybox initramfs whose /init starts kiln-agent. The host reaches it over TCP through
//! QEMU's user-mode port forward on 127.0.0.1 (vsock needs kiln's own vhost-user device,
//! which the vmm crate provides; this test is about the binary running on another kernel
//! with no libc in the guest at all).
//!
//! Needs qemu-system-x86_64, busybox-static, cpio, gzip, the static agent
//! (target/agent/kiln-agent, made by kiln's build) and the cloud kernel unpacked in
//! kiln's cache (the tests crate's kit fetches it); skips loudly when any is missing.

use crate::common;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::{Client, ExecRequest, PutOptions};

/// In dependency order (no modprobe in the initramfs).
const MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

fn static_agent() -> Option<PathBuf> {
    let bin = Path::new(common::AGENT);
    [
        bin.parent()?.join("../agent/kiln-agent"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/agent/kiln-agent"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// `<cache>/test-kernel/linux-image-*/`, where the tests crate unpacks the cloud kernel.
/// The Debian cloud kernel and its modules, fetched into kiln's cache by the test kit when
/// missing (so this test does not depend on another test having fetched it first).
fn cloud_kernel() -> Result<(PathBuf, PathBuf), String> {
    let k = kiln_e2e::kernel::guest_kernel().map_err(|e| e.to_string())?;
    Ok((k.vmlinuz, k.modules_dir.join("kernel")))
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if p
            .file_name()
            .is_some_and(|f| f == format!("{name}.ko").as_str())
        {
            return Some(p);
        }
    }
    None
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in MODULES; do insmod /lib/modules/$m.ko; done
hostname kiln-guest
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
echo "kiln-guest: starting the agent"
exec /bin/kiln-agent --listen tcp:0.0.0.0:1024 --power-action system --work-dir /tmp/kiln
"#;

fn build_initramfs(dir: &Path, agent: &Path, modules: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "lib/modules",
        "etc",
        "tmp",
        "root",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for m in MODULES {
        let f = find_module(modules, m)
            .unwrap_or_else(|| panic!("module {m} not in the kernel package"));
        std::fs::copy(f, root.join(format!("lib/modules/{m}.ko"))).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::copy(agent, root.join("bin/kiln-agent")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "ID=kilntest\nVERSION_ID=1\nPRETTY_NAME=\"kiln agent test guest\"\n",
    )
    .unwrap();
    let init = root.join("init");
    std::fs::write(&init, INIT.replace("MODULES", &MODULES.join(" "))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio/gzip failed");
    out
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_static_agent_serves_from_a_real_guest_kernel() {
    let Some(agent) = static_agent() else {
        kiln_e2e::skip("no static agent at target/agent/kiln-agent (building kiln makes it)");
        return;
    };
    let (kernel, modules) = match cloud_kernel() {
        Ok(k) => k,
        Err(e) => {
            kiln_e2e::skip(format_args!(
                "the Debian cloud kernel could not be had: {e}"
            ));
            return;
        }
    };
    for tool in ["qemu-system-x86_64", "cpio", "gzip"] {
        if !which(tool) {
            kiln_e2e::skip(format_args!("{tool} is not installed"));
            return;
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        kiln_e2e::skip("busybox-static is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_initramfs(dir.path(), &agent, &modules);
    let port = free_port();
    let console = dir.path().join("console.log");
    let qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "q35", "-m", "256", "-smp", "1"])
            .args(["-nographic", "-no-reboot", "-nodefaults", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:1024"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu"),
    );
    let start = Instant::now();
    let connect = || -> kiln_agent::client::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|source| {
            kiln_agent::ClientError::Connect {
                path: format!("127.0.0.1:{port}"),
                source,
            }
        })?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(kiln_agent::ClientError::Send)?;
        let mut c = Client::new(s)?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(c)
    };
    let mut c = match Client::connect_when_ready(connect, Duration::from_secs(120)) {
        Ok(c) => c,
        Err(e) => panic!(
            "the guest agent never answered ({e}); console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        ),
    };
    eprintln!("guest agent answered after {:?}", start.elapsed());
    let h = c.hello().clone();
    assert_eq!(h.guest.hostname, "kiln-guest");
    assert_eq!(h.guest.distro_id, "kilntest");
    assert!(
        h.guest.kernel_release.contains("cloud-amd64"),
        "{:?}",
        h.guest
    );
    assert_eq!(h.guest.init, "kiln-agent");

    let out = c
        .exec_output(&ExecRequest::argv([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(out.status.code, Some(3));
    let out = c
        .exec_output(&ExecRequest::argv(["id", "-u"]).user("nobody"))
        .unwrap();
    assert_eq!(out.stdout, b"65534\n");
    // Orphans re-parented to the agent (PID 1 here) are reaped, not left as zombies.
    let out = c
        .exec_output(&ExecRequest::argv([
            "sh",
            "-c",
            "(sleep 0.2 &) ; sleep 1; grep -l '^State:.*Z' /proc/[0-9]*/status || echo no-zombies",
        ]))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no-zombies\n");
    let st = c
        .exec_output(&ExecRequest::argv(["sleep", "100"]).timeout(Duration::from_millis(500)))
        .unwrap()
        .status;
    assert!(st.timed_out);

    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 + i / 4096) as u8;
    }
    let src = dir.path().join("payload");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&data)
        .unwrap();
    c.put_file(
        &src,
        "/root/payload",
        &PutOptions {
            mode: 0o600,
            owner: Some("nobody".into()),
            ..PutOptions::default()
        },
    )
    .unwrap();
    let st = c.stat("/root/payload").unwrap().unwrap();
    assert_eq!(
        (st.size, st.mode, st.uid),
        (data.len() as u64, 0o600, 65534)
    );
    let mut back = Vec::new();
    c.get_to_writer("/root/payload", &mut back).unwrap();
    assert!(back == data);
    c.sync().unwrap();
    // The agent is PID 1 here: poweroff is acknowledged, then reboot(2) ends the VM.
    c.poweroff().unwrap();
    let mut q = qemu;
    let gone = common::wait_until(Duration::from_secs(60), || {
        matches!(q.0.try_wait(), Ok(Some(_)))
    });
    assert!(gone, "the VM did not power off");
}
