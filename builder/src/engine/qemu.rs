//! The `qemu` engine: QEMU with TCG supplies only the CPU; disks, vsock and the NIC are kiln's
//! own device backends, served over vhost-user from this process. Guest memory is a shared
//! memfd so the backends can map it.
//!
//! QEMU runs in its own process group (a Ctrl-C on the terminal reaches kiln, which then stops
//! every VM in order) and dies with the thread that started it (`PR_SET_PDEATHSIG`), so a
//! killed kiln leaves no VM behind. A guest reboot keeps QEMU running (no `-no-reboot`); a
//! guest power-off ends it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Engine, EngineError, RunningVm, VmLaunch};

/// Finds `qemu-system-x86_64` on PATH (or `$KILN_QEMU`).
pub fn find_qemu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_QEMU").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// How a disk reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMode {
    /// kiln's block backend over vhost-user (the product).
    VhostUser,
    /// QEMU's own virtio-blk on the qcow2 file. STEPPING STONE until kiln-vmm's vhost-user
    /// block backend lands; never chosen once it exists.
    QemuDrive,
}

pub struct QemuEngine {
    qemu: PathBuf,
    block: BlockMode,
}

impl QemuEngine {
    pub fn new() -> Result<Self, EngineError> {
        let qemu = find_qemu().ok_or_else(|| EngineError::Missing {
            program: "qemu-system-x86_64".into(),
            hint: "Debian package qemu-system-x86; scripts/setup.sh installs it".into(),
        })?;
        Ok(Self {
            qemu,
            block: crate::backends::block_mode(),
        })
    }
}

/// The QEMU command line for a VM (without the program name). Public for tests and
/// `kiln build --dry-run`-style inspection.
pub fn qemu_args(vm: &VmLaunch, block: BlockMode, vsock_sock: Option<&Path>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    let mem = format!("{}M", vm.memory_mib);
    push("-nodefaults");
    push("-no-user-config");
    push("-name");
    push(&format!("kiln-{}", vm.name));
    push("-accel");
    push("tcg,thread=multi");
    push("-machine");
    push("q35,memory-backend=mem");
    push("-cpu");
    push("max");
    push("-m");
    push(&mem);
    push("-smp");
    push(&vm.cpus.max(1).to_string());
    push("-object");
    push(&format!("memory-backend-memfd,id=mem,size={mem},share=on"));
    push("-display");
    push("none");
    push("-monitor");
    push("none");
    push("-serial");
    a.push(format!("file:{}", vm.serial_log.display()).into());
    a.push("-kernel".into());
    a.push(vm.boot.kernel.clone().into());
    if let Some(i) = &vm.boot.initrd {
        a.push("-initrd".into());
        a.push(i.clone().into());
    }
    a.push("-append".into());
    a.push(vm.cmdline().into());
    for (i, d) in vm.disks.iter().enumerate() {
        match block {
            BlockMode::VhostUser => {
                a.push("-chardev".into());
                a.push(
                    format!(
                        "socket,id=blk{i},path={}",
                        block_socket(&vm.workdir, i).display()
                    )
                    .into(),
                );
                a.push("-device".into());
                // One queue: the backend serves exactly what it offers.
                a.push(format!("vhost-user-blk-pci,chardev=blk{i},num-queues=1").into());
            }
            BlockMode::QemuDrive => {
                let ro = if d.read_only { ",read-only=on" } else { "" };
                a.push("-drive".into());
                a.push(
                    format!(
                        "file={},if=none,id=d{i},cache=unsafe,discard=unmap{ro}",
                        d.path.display()
                    )
                    .into(),
                );
                a.push("-device".into());
                a.push(format!("virtio-blk-pci,drive=d{i}").into());
            }
        }
    }
    if let Some(s) = vsock_sock {
        a.push("-chardev".into());
        a.push(format!("socket,id=vsock,path={}", s.display()).into());
        a.push("-device".into());
        a.push("vhost-user-vsock-pci,chardev=vsock".into());
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        a.push("-chardev".into());
        a.push(
            format!(
                "socket,id=net{i},path={}",
                net_socket(&vm.workdir, i).display()
            )
            .into(),
        );
        a.push("-netdev".into());
        a.push(format!("vhost-user,id=n{i},chardev=net{i}").into());
        a.push("-device".into());
        // vectors=0 (INTx): QEMU 7.2 crashes in msix_set_vector_notifiers when a vhost-user
        // netdev starts with MSI-X vectors.
        a.push(
            format!(
                "virtio-net-pci,netdev=n{i},mac={},vectors=0",
                nic.mac_string()
            )
            .into(),
        );
    }
    a
}

/// Where the vhost-user socket of NIC `i` lives (kiln-vmm's relay; the backend proper
/// listens on `<socket>.backend`).
pub fn net_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("net{i}.sock"))
}

/// Where the vhost-user socket of disk `i` lives.
pub fn block_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("blk{i}.sock"))
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch(&self, vm: &VmLaunch) -> Result<Box<dyn RunningVm>, EngineError> {
        std::fs::create_dir_all(&vm.workdir).map_err(|source| EngineError::Io {
            what: "creating",
            path: vm.workdir.clone(),
            source,
        })?;
        // Backends listen first: QEMU connects to their sockets as a client.
        let backends = crate::backends::start(vm, self.block)?;
        let args = qemu_args(vm, self.block, backends.vsock_socket());
        let stderr_path = vm.workdir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| EngineError::Io {
            what: "creating",
            path: stderr_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: only async-signal-safe calls (setpgid, prctl) run between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Own process group: the terminal's Ctrl-C goes to kiln, which stops VMs in order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the kiln thread that started us, whatever happens to kiln.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(vm = %vm.name, "qemu {:?}", args);
        let child = cmd.spawn().map_err(|source| EngineError::Spawn {
            what: format!("{}", self.qemu.display()),
            source,
        })?;
        Ok(Box::new(QemuVm {
            child,
            backends,
            stderr_path,
            vsock: vm.workdir.join("vsock.sock"),
        }))
    }
}

struct QemuVm {
    child: Child,
    backends: crate::backends::Backends,
    stderr_path: PathBuf,
    vsock: PathBuf,
}

impl QemuVm {
    fn log_exit(&self, st: &ExitStatus) {
        if !st.success() {
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            tracing::warn!("qemu exited with {st}: {}", err.trim());
        }
    }
}

impl RunningVm for QemuVm {
    fn vsock_socket(&self) -> &Path {
        &self.vsock
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.log_exit(&st);
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.backends.stop();
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last lines of QEMU's stderr for a VM (for error messages).
pub fn stderr_tail(workdir: &Path) -> String {
    let t = std::fs::read_to_string(workdir.join("qemu.stderr")).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DiskAttach;
    use crate::sources::BootFiles;

    fn launch() -> VmLaunch {
        VmLaunch {
            name: "web".into(),
            cpus: 2,
            memory_mib: 1024,
            boot: BootFiles {
                kernel: "/c/vmlinuz".into(),
                initrd: Some("/c/initrd.img".into()),
                root: "/dev/vda".into(),
            },
            cmdline_extra: vec![],
            disks: vec![DiskAttach {
                name: "root".into(),
                path: "/w/root.qcow2".into(),
                read_only: false,
            }],
            workdir: "/w".into(),
            serial_log: "/w/serial.log".into(),
            cid: 3,
            nics: vec![],
        }
    }

    fn joined(a: &[OsString]) -> String {
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_uses_shared_memory_and_vhost_user() {
        let s = joined(&qemu_args(
            &launch(),
            BlockMode::VhostUser,
            Some(Path::new("/w/vsock.sock")),
        ));
        assert!(s.contains("-accel tcg"), "{s}");
        assert!(
            s.contains("memory-backend-memfd,id=mem,size=1024M,share=on"),
            "{s}"
        );
        assert!(s.contains("q35,memory-backend=mem"));
        assert!(s.contains("-m 1024M -smp 2"));
        assert!(s.contains("socket,id=blk0,path=/w/blk0.sock"));
        assert!(s.contains("vhost-user-blk-pci,chardev=blk0,num-queues=1"));
        assert!(s.contains("vhost-user-vsock-pci,chardev=vsock"));
        assert!(s.contains("root=/dev/vda rw console=ttyS0 systemd.hostname=web"));
        assert!(!s.contains("-no-reboot"), "reboots must keep QEMU running");
    }

    #[test]
    fn one_vhost_user_net_device_per_nic_without_msix() {
        let mut l = launch();
        let (port, _other) = kiln_net::port_pair(4).unwrap();
        let port: std::sync::Arc<dyn kiln_net::FramePort> = std::sync::Arc::new(port);
        for (i, name) in ["eth0", "eth1"].iter().enumerate() {
            l.nics.push(crate::engine::NicAttach {
                name: (*name).into(),
                mac: [0x02, 0x6b, 0x6c, 0, 0, i as u8],
                port: port.clone(),
            });
        }
        let s = joined(&qemu_args(&l, BlockMode::VhostUser, None));
        for i in 0..2 {
            assert!(
                s.contains(&format!("socket,id=net{i},path=/w/net{i}.sock")),
                "{s}"
            );
            assert!(
                s.contains(&format!("vhost-user,id=n{i},chardev=net{i}")),
                "{s}"
            );
            assert!(
                s.contains(&format!(
                    "virtio-net-pci,netdev=n{i},mac=02:6b:6c:00:00:0{i},vectors=0"
                )),
                "{s}"
            );
        }
        assert!(!joined(&qemu_args(&launch(), BlockMode::VhostUser, None)).contains("netdev"));
    }
}
