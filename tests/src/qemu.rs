//! Running a guest under `qemu-system-x86_64 -accel tcg` for real-driver tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{KitError, Result};

pub const QEMU: &str = "qemu-system-x86_64";

/// Whether qemu-system-x86_64 can be run here.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Direct boot (`-kernel`); `None` boots the first disk through the machine's firmware.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot; `console=ttyS0` is added.
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Back guest memory with a shared memfd: needed by every vhost-user device.
    pub shared_memory: bool,
    /// `-chardev`/`-device`/... arguments for the devices under test.
    pub args: Vec<String>,
    /// Serial console goes here.
    pub serial_log: PathBuf,
    /// Exit instead of resetting when the guest reboots (`-no-reboot`); on by default.
    pub no_reboot: bool,
    /// `-M` value: `q35` by default (virtio-pci, which the cloud kernel finds without
    /// ACPI/device-tree declarations of virtio-mmio devices).
    pub machine: String,
}

impl QemuConfig {
    pub fn new(kernel: &Path, initrd: &Path, serial_log: &Path) -> Self {
        QemuConfig {
            kernel: Some(kernel.to_path_buf()),
            initrd: Some(initrd.to_path_buf()),
            // no_timer_check: on a loaded host TCG can miss the kernel's early IO-APIC
            // timer check, which then panics the boot ("IO-APIC + timer doesn't work").
            append: "quiet panic=-1 no_timer_check".into(),
            memory_mib: 512,
            cpus: 1,
            shared_memory: true,
            args: Vec::new(),
            serial_log: serial_log.to_path_buf(),
            no_reboot: true,
            machine: "q35".into(),
        }
    }

    /// A guest booted by firmware from its disks (given with [`QemuConfig::arg`]): SeaBIOS,
    /// QEMU's default, unless the arguments add OVMF as pflash.
    pub fn firmware(serial_log: &Path) -> Self {
        QemuConfig {
            kernel: None,
            initrd: None,
            append: String::new(),
            memory_mib: 1024,
            shared_memory: false,
            ..QemuConfig::new(Path::new(""), Path::new(""), serial_log)
        }
    }

    /// Add arguments (e.g. `["-chardev", "socket,id=c0,path=/tmp/s"]`).
    pub fn arg<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The full qemu command line.
    pub fn command_line(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-M".into(),
            self.machine.clone(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.cpus.to_string(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-nodefaults".into(),
            "-serial".into(),
            format!("file:{}", self.serial_log.display()),
        ];
        if let Some(kernel) = &self.kernel {
            v.extend(["-kernel".into(), kernel.display().to_string()]);
            if let Some(initrd) = &self.initrd {
                v.extend(["-initrd".into(), initrd.display().to_string()]);
            }
            v.extend(["-append".into(), format!("console=ttyS0 {}", self.append)]);
        }
        if self.no_reboot {
            v.push("-no-reboot".into());
        }
        if self.shared_memory {
            v.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ),
                "-machine".into(),
                "memory-backend=mem".into(),
            ]);
        }
        v.extend(self.args.iter().cloned());
        v
    }
}

/// A running guest; killed when dropped.
pub struct Qemu {
    child: Child,
    serial_log: PathBuf,
    stderr_log: PathBuf,
}

impl Qemu {
    pub fn spawn(cfg: &QemuConfig) -> Result<Qemu> {
        let stderr_log = cfg.serial_log.with_extension("qemu-stderr");
        let stderr = std::fs::File::create(&stderr_log)
            .map_err(KitError::io(format!("create {}", stderr_log.display())))?;
        let child = Command::new(QEMU)
            .args(cfg.command_line())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(KitError::io(format!("start {QEMU}")))?;
        Ok(Qemu {
            child,
            serial_log: cfg.serial_log.clone(),
            stderr_log,
        })
    }

    /// Serial output so far (plus qemu's own stderr, if any).
    pub fn output(&self) -> String {
        let mut s = std::fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Ok(e) = std::fs::read_to_string(&self.stderr_log) {
            if !e.trim().is_empty() {
                s.push_str("\n--- qemu stderr ---\n");
                s.push_str(&e);
            }
        }
        s
    }

    /// Wait until a serial line contains `marker`; returns that line.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let out = std::fs::read(&self.serial_log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if let Some(line) = out.lines().find(|l| l.contains(marker)) {
                return Ok(line.trim_end_matches('\r').to_string());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Re-read once: the guest may have printed the marker just before exiting.
                let out = self.output();
                if let Some(line) = out.lines().find(|l| l.contains(marker)) {
                    return Ok(line.trim_end_matches('\r').to_string());
                }
                return Err(KitError::GuestExited {
                    marker: marker.into(),
                    output: out,
                });
            }
            if start.elapsed() > timeout {
                return Err(KitError::Timeout {
                    marker: marker.into(),
                    secs: timeout.as_secs(),
                    output: self.output(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for qemu to exit (the guest powered off); true if it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
