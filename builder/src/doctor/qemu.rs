//! QEMU as the qemu engine uses it: its version, TCG, the vhost-user devices kiln's backends
//! serve, and guest memory in a shared memfd the backends can map.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Finding, Status};

/// The devices the qemu engine puts on QEMU's command line for kiln's backends.
pub const REQUIRED_DEVICES: &[&str] = &[
    "vhost-user-blk-pci",
    "vhost-user-vsock-pci",
    "virtio-net-pci",
];

/// One `qemu-system-x86_64 ...` query may take this long before it counts as hung.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuFacts {
    pub path: PathBuf,
    /// `QEMU emulator version X.Y.Z` (None when it did not say).
    pub version: Option<String>,
    pub tcg: bool,
    /// Of [`REQUIRED_DEVICES`], the ones this QEMU lacks.
    pub missing_devices: Vec<String>,
    pub memfd: bool,
}

impl QemuFacts {
    /// None when there is no `qemu-system-x86_64` (PATH or `KILN_QEMU`).
    pub fn probe() -> Option<Self> {
        let path = crate::engine::qemu::find_qemu()?;
        let ask = |args: &[&str]| query(&path, args, QUERY_TIMEOUT).unwrap_or_default();
        let version = version_of(&ask(&["-version"]));
        let accels = ask(&["-accel", "help"]);
        let devices = ask(&["-device", "help"]);
        let objects = ask(&["-object", "help"]);
        Some(QemuFacts {
            tcg: accels.lines().any(|l| l.trim() == "tcg"),
            missing_devices: REQUIRED_DEVICES
                .iter()
                .filter(|d| !devices.contains(&format!("\"{d}\"")))
                .map(|d| d.to_string())
                .collect(),
            memfd: objects.lines().any(|l| l.trim() == "memory-backend-memfd"),
            version,
            path,
        })
    }
}

/// The version from `-version`'s first line.
fn version_of(out: &str) -> Option<String> {
    let rest = out.lines().next()?.strip_prefix("QEMU emulator version ")?;
    Some(rest.split_whitespace().next()?.to_string())
}

/// Runs QEMU with `args` and returns its stdout, or None when it fails or runs past `timeout`.
fn query(qemu: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    // Read on a thread so a full pipe cannot stall the wait below.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.by_ref().take(1 << 20).read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = reader.join().ok()?;
    status.filter(|s| s.success()).map(|_| out)
}

/// The qemu engine's finding: fatal when `--engine auto` needs QEMU and it cannot serve.
pub fn finding(facts: Option<&QemuFacts>, auto_is_kvm: bool) -> Finding {
    // Without usable KVM every build is QEMU's; with it, QEMU is only a fallback.
    let status = if auto_is_kvm {
        Status::Warn
    } else {
        Status::Fail
    };
    let Some(q) = facts else {
        return Finding::bad(
            "qemu",
            status,
            "qemu-system-x86_64 not found (PATH, KILN_QEMU)",
            "install the Debian packages qemu-system-x86 and qemu-utils (scripts/setup.sh \
             does), or set KILN_QEMU to the binary",
        );
    };
    let version = q.version.as_deref().unwrap_or("unknown version");
    let mut lacks = vec![];
    if !q.tcg {
        lacks.push("the TCG accelerator".to_string());
    }
    lacks.extend(q.missing_devices.iter().map(|d| format!("the device {d}")));
    if !q.memfd {
        lacks.push("memory-backend-memfd".to_string());
    }
    if lacks.is_empty() {
        return Finding::ok(
            "qemu",
            format!(
                "{} {version}: TCG, vhost-user devices, memfd memory",
                q.path.display()
            ),
        );
    }
    Finding::bad(
        "qemu",
        status,
        format!("{} {version} lacks {}", q.path.display(), lacks.join(", ")),
        "install Debian's qemu-system-x86 (7.2 or later has everything kiln uses), or point \
         KILN_QEMU at a full build",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> QemuFacts {
        QemuFacts {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: Some("7.2.15".into()),
            tcg: true,
            missing_devices: vec![],
            memfd: true,
        }
    }

    #[test]
    fn the_version_comes_from_the_first_line() {
        let out = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u16)\nCopyright";
        assert_eq!(version_of(out).as_deref(), Some("7.2.15"));
        assert_eq!(version_of("something else"), None);
    }

    #[test]
    fn missing_qemu_fails_only_where_builds_need_it() {
        assert_eq!(finding(None, false).status, Status::Fail);
        assert_eq!(finding(None, true).status, Status::Warn);
        assert!(finding(None, false)
            .fix
            .unwrap()
            .contains("qemu-system-x86"));
    }

    #[test]
    fn a_qemu_without_what_kiln_uses_names_what_it_lacks() {
        assert_eq!(finding(Some(&facts()), false).status, Status::Ok);
        let mut q = facts();
        q.tcg = false;
        q.missing_devices = vec!["vhost-user-blk-pci".into()];
        let f = finding(Some(&q), false);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.found.contains("TCG") && f.found.contains("vhost-user-blk-pci"),
            "{f:?}"
        );
    }

    #[test]
    fn a_query_that_hangs_is_stopped_at_its_timeout() {
        // `sleep` stands in for a QEMU that never answers.
        let start = Instant::now();
        assert_eq!(
            query(Path::new("/bin/sleep"), &["30"], Duration::from_millis(300)),
            None
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            query(Path::new("/bin/echo"), &["tcg"], QUERY_TIMEOUT).as_deref(),
            Some("tcg\n")
        );
        assert!(query(Path::new("/nonexistent/qemu"), &[], QUERY_TIMEOUT).is_none());
    }
}
