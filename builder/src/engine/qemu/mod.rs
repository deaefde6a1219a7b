//! The `qemu` engine: QEMU with TCG supplies only the CPU; disks, vsock and the NIC are kiln's
//! own device backends, served over vhost-user from this process. Guest memory is a shared
//! memfd so the backends can map it.
//!
//! QEMU runs in its own process group (a Ctrl-C on the terminal reaches kiln, which then stops
//! every VM in order) and dies with the thread that started it (`PR_SET_PDEATHSIG`), so a
//! killed kiln leaves no VM behind. QEMU runs with `-no-reboot`: a guest reboot ends it and
//! the engine starts a fresh QEMU on the same backends (see [`supervise`]); a guest power-off
//! ends the VM.

use crate::path_io::PathIoError;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

pub mod backends;
pub mod control;
pub mod qmp;
mod stream_nic;
pub mod vnc;

pub use backends::{block_socket, nbd_socket, net_socket, stream_socket, BlockMode};
pub use vnc::{vnc_password_file, vnc_socket};

use super::firmware::HostFirmware;
use super::{BootMode, Engine, EngineError, RunningVm, VmLaunch};
use crate::job::{DiskBus, NicModel};

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

pub struct QemuEngine {
    qemu: PathBuf,
    block: BlockMode,
    firmware: HostFirmware,
}

impl QemuEngine {
    pub fn new() -> Result<Self, EngineError> {
        let qemu = find_qemu().ok_or_else(|| EngineError::Missing {
            program: "qemu-system-x86_64".into(),
            hint: "Debian package qemu-system-x86; scripts/setup.sh installs it".into(),
        })?;
        Ok(Self {
            qemu,
            block: backends::block_mode(),
            firmware: HostFirmware::find(),
        })
    }
}

/// The QEMU command line for a VM (without the program name). Public for tests and
/// `kiln build --dry-run`-style inspection.
pub fn qemu_args(
    vm: &VmLaunch,
    block: BlockMode,
    vsock_sock: Option<&Path>,
    firmware: &HostFirmware,
) -> Result<Vec<OsString>, EngineError> {
    let mut a: Vec<OsString> = Vec::new();
    let secure_boot = matches!(
        &vm.boot,
        BootMode::Firmware(f) if f.firmware == crate::job::Firmware::UefiSecureBoot
    );
    let mut push = |s: &str| a.push(s.into());
    let mem = format!("{}M", vm.memory_mib);
    push("-nodefaults");
    push("-no-user-config");
    push("-name");
    push(&format!("kiln-{}", vm.name));
    push("-accel");
    push("tcg,thread=multi");
    push("-machine");
    // Secure Boot's variables are guarded by SMM: without it the guest could rewrite them.
    // `graphics=off` makes SeaBIOS print to the serial console, where a boot failure
    // (`No bootable device.`) can be seen.
    push(match (&vm.boot, secure_boot) {
        (BootMode::Direct(_), _) => "q35,memory-backend=mem",
        (BootMode::Firmware(_), false) => "q35,memory-backend=mem,graphics=off",
        (BootMode::Firmware(_), true) => "q35,memory-backend=mem,graphics=off,smm=on",
    });
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
    // A screen to type into and take screenshots of; SeaBIOS and GRUB keep writing to the
    // serial console too (`graphics=off`), where the boot-failure watch reads them.
    // At a fixed slot past the ones QEMU hands out, so the disks keep the PCI addresses a
    // clone (which has no screen) sees: OVMF's boot entries in the captured NVRAM name them.
    if vm.peripherals.screen {
        push("-device");
        push(VGA_DEVICE);
        if vm.peripherals.console {
            for arg in vnc::vnc_args(&vm.workdir) {
                push(&arg);
            }
        }
    }
    push("-monitor");
    push("none");
    // A reboot starts a fresh QEMU: append to the log (`-serial file:` would truncate it).
    push("-chardev");
    push(&format!(
        "file,id=serial,path={},append=on",
        vm.serial_log.display()
    ));
    push("-serial");
    push("chardev:serial");
    push("-no-reboot");
    match &vm.boot {
        BootMode::Direct(boot) => {
            a.push("-kernel".into());
            a.push(boot.kernel.clone().into());
            if let Some(i) = &boot.initrd {
                a.push("-initrd".into());
                a.push(i.clone().into());
            }
            a.push("-append".into());
            a.push(vm.cmdline(boot).into());
        }
        BootMode::Firmware(fw) => {
            let files = firmware.files(fw.firmware)?;
            match (&files.vars_template, &fw.nvram) {
                (None, _) => {
                    a.push("-bios".into());
                    a.push(files.code.into());
                }
                (Some(_), Some(nvram)) => {
                    if secure_boot {
                        a.push("-global".into());
                        a.push("driver=cfi.pflash01,property=secure,value=on".into());
                    }
                    a.push("-drive".into());
                    a.push(pflash(&files.code, 0, true).into());
                    a.push("-drive".into());
                    a.push(pflash(nvram, 1, false).into());
                }
                (Some(_), None) => {
                    return Err(EngineError::Backend(format!(
                        "{} boot needs the VM's own NVRAM file",
                        fw.firmware.as_str()
                    )))
                }
            }
        }
    }
    let mut sata_ports = 0;
    // The boot disk first, then the first CD: one order for the install and every boot after.
    // Firmware boots only: with `-kernel` QEMU's own boot ROM holds the first boot index.
    let firmware = matches!(vm.boot, BootMode::Firmware(_));
    let has_cd = !vm.peripherals.cdroms.is_empty() && firmware;
    for (i, d) in vm.disks.iter().enumerate() {
        let order = if i == 0 && has_cd { ",bootindex=0" } else { "" };
        match (d.bus, block) {
            (DiskBus::Scsi | DiskBus::Sata, _) => {
                a.push("-blockdev".into());
                a.push(nbd_blockdev(&nbd_socket(&vm.workdir, i), i, d.read_only).into());
                let serial: String = d.name.chars().take(20).collect();
                a.push("-device".into());
                if d.bus == DiskBus::Scsi {
                    if !a.iter().any(|x| x == "virtio-scsi-pci,id=scsi0") {
                        a.push("virtio-scsi-pci,id=scsi0".into());
                        a.push("-device".into());
                    }
                    a.push(format!("scsi-hd,drive=d{i},bus=scsi0.0,serial={serial}{order}").into());
                } else {
                    // q35's built-in AHCI controller has six ports, ide.0 to ide.5.
                    a.push(
                        format!("ide-hd,drive=d{i},bus=ide.{sata_ports},serial={serial}{order}")
                            .into(),
                    );
                    sata_ports += 1;
                }
            }
            (DiskBus::Virtio, BlockMode::VhostUser) => {
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
                a.push(format!("vhost-user-blk-pci,chardev=blk{i},num-queues=1{order}").into());
            }
            (DiskBus::Virtio, BlockMode::QemuDrive) => {
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
                a.push(format!("virtio-blk-pci,drive=d{i}{order}").into());
            }
        }
    }
    for (i, iso) in vm.peripherals.cdroms.iter().enumerate() {
        if sata_ports >= AHCI_PORTS {
            return Err(EngineError::Backend(format!(
                "{} sata disks and CD-ROMs: q35's AHCI controller has {AHCI_PORTS} ports",
                sata_ports + vm.peripherals.cdroms.len() - i
            )));
        }
        let path = iso.to_string_lossy().replace(',', ",,");
        a.push("-drive".into());
        a.push(format!("if=none,id=cd{i},media=cdrom,readonly=on,format=raw,file={path}").into());
        a.push("-device".into());
        let order = if i == 0 && firmware {
            ",bootindex=1"
        } else {
            ""
        };
        a.push(format!("ide-cd,drive=cd{i},bus=ide.{sata_ports}{order}").into());
        sata_ports += 1;
    }
    if let Some(floppy) = &vm.peripherals.floppy {
        let path = floppy.to_string_lossy().replace(',', ",,");
        a.push("-drive".into());
        a.push(format!("if=none,id=fd0,format=raw,file={path}").into());
        // q35 has no floppy controller of its own: an ISA one, drive A a 1.44 MB drive.
        a.push("-device".into());
        a.push("isa-fdc,id=fdc0".into());
        a.push("-device".into());
        a.push("floppy,unit=0,drive=fd0,drive-type=144".into());
    }
    if let Some(s) = vsock_sock {
        a.push("-chardev".into());
        a.push(format!("socket,id=vsock,path={}", s.display()).into());
        a.push("-device".into());
        a.push("vhost-user-vsock-pci,chardev=vsock".into());
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        let mac = nic.mac_string();
        let device = match nic.model {
            NicModel::Virtio => {
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
                // vectors=0 (INTx): QEMU 7.2 crashes in msix_set_vector_notifiers when a
                // vhost-user netdev starts with MSI-X vectors.
                format!("virtio-net-pci,netdev=n{i},mac={mac},vectors=0")
            }
            NicModel::E1000 | NicModel::E1000e => {
                // QEMU is the client: kiln's socket listens before QEMU starts, and again for
                // the fresh QEMU of each reboot (7.2's stream netdev cannot reconnect).
                let path = stream_socket(&vm.workdir, i)
                    .to_string_lossy()
                    .replace(',', ",,");
                a.push("-netdev".into());
                a.push(format!("stream,id=n{i},server=off,addr.type=unix,addr.path={path}").into());
                format!("{},netdev=n{i},mac={mac}", nic.model.as_str())
            }
        };
        a.push("-device".into());
        a.push(device.into());
    }
    Ok(a)
}

/// The screen: standard VGA at slot 0x1e, free on q35 (0x1f holds the LPC, AHCI and SMBus
/// functions) and past the slots QEMU assigns from 1 up.
const VGA_DEVICE: &str = "VGA,addr=0x1e";

/// Ports of q35's built-in AHCI controller (`ide.0` to `ide.5`), shared by sata disks and CDs.
const AHCI_PORTS: usize = 6;

/// A UEFI flash drive: the firmware's code (read-only) or the VM's variable store. Commas in
/// the path are doubled, as QEMU's option syntax wants.
fn pflash(path: &Path, unit: u32, read_only: bool) -> String {
    let path = path.to_string_lossy().replace(',', ",,");
    let ro = if read_only { ",readonly=on" } else { "" };
    format!("if=pflash,format=raw,unit={unit},file={path}{ro}")
}

/// A `-blockdev` for kiln-disk's NBD export of disk `i` (node `d<i>`); JSON, so the socket
/// path needs no escaping of commas.
fn nbd_blockdev(socket: &Path, i: usize, read_only: bool) -> String {
    serde_json::json!({
        "driver": "nbd",
        "server": { "type": "unix", "path": socket },
        "export": "",
        "node-name": format!("d{i}"),
        "read-only": read_only,
    })
    .to_string()
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch(&self, vm: &VmLaunch) -> Result<Box<dyn RunningVm>, EngineError> {
        vm.create_workdir()?;
        // A missing firmware file is this call's error, before any backend starts.
        if let BootMode::Firmware(fw) = &vm.boot {
            self.firmware.files(fw.firmware)?;
            if let (crate::job::Firmware::UefiSecureBoot, Some(nvram)) = (fw.firmware, &fw.nvram) {
                check_secure_boot_keys(nvram)?;
            }
        }
        // Backends listen first: QEMU connects to their sockets as a client, and connects
        // again when a reboot starts a fresh QEMU.
        let mut backends = backends::start(vm, self.block)?;
        let exports = backends.take_exports();
        let mut args = qemu_args(vm, self.block, backends.vsock_socket(), &self.firmware)?;
        let qmp = qmp_socket(&vm.workdir);
        let _ = std::fs::remove_file(&qmp);
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qmp.display()).into());
        if vm.peripherals.screen {
            // A second monitor for commands (keys, screenshots): the first is the
            // supervisor's, which waits for the guest's shutdown on it.
            let control = control_socket(&vm.workdir);
            let _ = std::fs::remove_file(&control);
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", control.display()).into());
        }
        if vm.peripherals.screen && vm.peripherals.console {
            // One password per VM start, kept across its reboots (each fresh QEMU reads it).
            vnc::write_password(&vm.workdir)?;
        }
        let stderr_path = vm.workdir.join("qemu.stderr");
        let spawn = QemuSpawn {
            qemu: self.qemu.clone(),
            args,
            stderr_path: stderr_path.clone(),
            qmp,
            name: vm.name.clone(),
        };
        // The first QEMU starts here, so a bad binary or argument is this call's error.
        let child = spawn.spawn()?;
        let shared = Arc::new(Supervised::default());
        shared.lock().pid = Some(child.id());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("kiln-qemu-{}", vm.name))
                .spawn(move || supervise(spawn, child, &shared, exports))
                .map_err(|source| EngineError::Spawn {
                    what: "the QEMU supervisor thread".into(),
                    source,
                })?
        };
        Ok(Box::new(QemuVm {
            shared,
            thread: Some(thread),
            backends,
            vsock: super::vsock_uds(&vm.workdir),
        }))
    }
}

/// Refuses a Secure Boot VM whose NVRAM has no Platform Key (e.g. one inherited from a
/// module built with plain UEFI): OVMF would boot it with Secure Boot silently off.
fn check_secure_boot_keys(nvram: &Path) -> Result<(), EngineError> {
    /// OVMF's 4 MiB builds keep a 528 KiB store; anything much larger is not one.
    const MAX_STORE: u64 = 4 << 20;
    let f = std::fs::File::open(nvram).map_err(PathIoError::at("opening", nvram))?;
    let mut store = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_STORE), &mut store)
        .map_err(PathIoError::at("reading", nvram))?;
    if super::firmware::has_platform_key(&store) {
        Ok(())
    } else {
        Err(EngineError::Backend(format!(
            "Secure Boot is asked for (`secureBoot: true`), but its NVRAM {} has no \
             Secure Boot keys enrolled (no Platform Key), so the firmware would boot with \
             Secure Boot off; start it from OVMF_VARS_4M.ms.fd (Microsoft keys) or a module \
             built with `secureBoot: true`",
            nvram.display()
        )))
    }
}

/// Where QEMU's QMP socket lives.
pub fn qmp_socket(workdir: &Path) -> PathBuf {
    workdir.join("qmp.sock")
}

/// The QMP socket for commands to a VM with a screen ([`super::Peripherals::screen`]):
/// key events and screenshots. Each fresh QEMU (one per boot) listens on it again.
pub fn control_socket(workdir: &Path) -> PathBuf {
    workdir.join("control.sock")
}

/// How to start (and, after a guest reboot, start again) one VM's QEMU.
struct QemuSpawn {
    qemu: PathBuf,
    args: Vec<OsString>,
    stderr_path: PathBuf,
    qmp: PathBuf,
    name: String,
}

impl QemuSpawn {
    fn spawn(&self) -> Result<Child, EngineError> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .map_err(PathIoError::at("creating", &self.stderr_path))?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&self.args)
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
                // Die with the kiln thread that started us (the supervisor, which lives as
                // long as this QEMU), whatever happens to kiln.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(vm = %self.name, "qemu {:?}", self.args);
        cmd.spawn().map_err(|source| EngineError::Spawn {
            what: format!("{}", self.qemu.display()),
            source,
        })
    }
}

/// What the supervisor thread and the [`QemuVm`] share.
type Supervised = crate::engine::supervised::Supervised<SupervisedState>;

#[derive(Default)]
struct SupervisedState {
    /// The QEMU running now.
    pid: Option<u32>,
    /// Set once the VM has ended for good (power-off, crash, or stopped).
    exit: Option<ExitStatus>,
    /// `kill` asks the supervisor to stop.
    stop: bool,
    /// Fresh QEMUs started for guest reboots.
    restarts: u32,
}

/// Runs one VM's QEMU until the VM ends: a guest reboot (QMP `SHUTDOWN` with reason
/// `guest-reset`, QEMU being run with `-no-reboot`) starts a fresh QEMU on the same backend
/// sockets; anything else is the VM's end. A fresh process per boot is what the kvm engine
/// does too, and under TCG a boot after an in-place reset ran about half as fast as the
/// first boot (tests/README.md, "Benchmark vs Packer"). The disks' NBD exports live across
/// reboots and stop when the VM ends, before its end is seen.
fn supervise(
    spawn: QemuSpawn,
    mut child: Child,
    shared: &Supervised,
    exports: Vec<kiln_disk::nbd::NbdServer>,
) {
    loop {
        let watch = qmp::ShutdownWatch::start(&spawn.qmp, Duration::from_secs(10));
        let status = loop {
            if shared.lock().stop {
                let _ = child.kill();
                break child.wait();
            }
            match child.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => break Err(e),
            }
        };
        let reason = watch.reason();
        let mut st = shared.lock();
        st.pid = None;
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vm = %spawn.name, "waiting for qemu: {e}");
                std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
            }
        };
        let reset = reason.as_deref() == Some("guest-reset");
        if reset && st.restarts >= super::MAX_RESETS {
            tracing::warn!(
                vm = %spawn.name,
                "the guest reset {} times: not starting it again",
                st.restarts
            );
        } else if !st.stop && status.success() && reset {
            drop(st);
            tracing::info!(vm = %spawn.name, "guest rebooted: starting a fresh QEMU");
            match spawn.spawn() {
                Ok(c) => {
                    child = c;
                    let mut st = shared.lock();
                    st.pid = Some(child.id());
                    st.restarts += 1;
                    // A kill that came while QEMU was being started is seen on the next turn.
                    continue;
                }
                Err(e) => {
                    tracing::warn!(vm = %spawn.name, "restarting qemu after a reboot: {e}");
                    st = shared.lock();
                }
            }
        }
        if !status.success() {
            let err = std::fs::read_to_string(&spawn.stderr_path).unwrap_or_default();
            tracing::warn!("qemu exited with {status}: {}", err.trim());
        }
        drop(st);
        // Flushed before the exit is seen: a capture that follows it sees every write.
        backends::stop_exports(exports);
        let mut st = shared.lock();
        st.exit = Some(status);
        shared.notify();
        return;
    }
}

struct QemuVm {
    shared: Arc<Supervised>,
    thread: Option<std::thread::JoinHandle<()>>,
    backends: backends::Backends,
    vsock: PathBuf,
}

impl RunningVm for QemuVm {
    fn vsock_socket(&self) -> &Path {
        &self.vsock
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        Ok(self.shared.wait_for(timeout, |st| st.exit))
    }

    fn is_running(&mut self) -> bool {
        self.shared.lock().exit.is_none()
    }

    fn kill(&mut self) {
        self.shared.lock().stop = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.backends.stop();
    }

    fn pids(&self) -> Vec<u32> {
        self.shared.lock().pid.into_iter().collect()
    }

    fn live_disks(&self) -> Vec<Arc<kiln_disk::LiveDisk>> {
        self.backends.live_disks()
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
            boot: BootMode::Direct(BootFiles {
                kernel: "/c/vmlinuz".into(),
                initrd: Some("/c/initrd.img".into()),
                root: "/dev/vda".into(),
                args: vec![],
            }),
            cmdline_extra: vec![],
            disks: vec![DiskAttach {
                name: "root".into(),
                path: "/w/root.qcow2".into(),
                read_only: false,
                bus: Default::default(),
            }],
            workdir: "/w".into(),
            serial_log: "/w/serial.log".into(),
            cid: 3,
            peripherals: Default::default(),
            nics: vec![],
        }
    }

    fn args_of(vm: &VmLaunch, block: BlockMode, vsock: Option<&Path>) -> Vec<OsString> {
        qemu_args(vm, block, vsock, &HostFirmware::default()).unwrap()
    }

    fn joined(a: &[OsString]) -> String {
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_uses_shared_memory_and_vhost_user() {
        let s = joined(&args_of(
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
        assert!(s.contains("-no-reboot"), "a reboot starts a fresh QEMU");
        assert!(
            s.contains("file,id=serial,path=/w/serial.log,append=on"),
            "{s}"
        );
    }

    #[test]
    fn firmware_boots_have_no_kernel_and_their_own_flash() {
        use crate::engine::FirmwareBoot;
        use crate::job::Firmware;
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "bios-256k.bin",
            "OVMF_CODE_4M.fd",
            "OVMF_VARS_4M.fd",
            "OVMF_CODE_4M.secboot.fd",
            "OVMF_VARS_4M.ms.fd",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let host = HostFirmware::find_in(dir.path(), dir.path());
        let d = dir.path().display();
        let mut l = launch();
        let boot = |firmware, nvram: Option<&str>| {
            BootMode::Firmware(FirmwareBoot {
                firmware,
                nvram: nvram.map(PathBuf::from),
            })
        };
        l.boot = boot(Firmware::Bios, None);
        let s = joined(&qemu_args(&l, BlockMode::VhostUser, None, &host).unwrap());
        assert!(s.contains(&format!("-bios {d}/bios-256k.bin")), "{s}");
        assert!(s.contains("q35,memory-backend=mem,graphics=off"), "{s}");
        assert!(!s.contains("-kernel") && !s.contains("-append") && !s.contains("pflash"));

        l.boot = boot(Firmware::Uefi, Some("/w/nv,ram.fd"));
        let s = joined(&qemu_args(&l, BlockMode::VhostUser, None, &host).unwrap());
        assert!(
            s.contains(&format!(
                "if=pflash,format=raw,unit=0,file={d}/OVMF_CODE_4M.fd,readonly=on"
            )),
            "{s}"
        );
        assert!(
            s.contains("if=pflash,format=raw,unit=1,file=/w/nv,,ram.fd "),
            "{s}"
        );
        assert!(!s.contains("smm=on") && !s.contains("-kernel") && !s.contains("-bios"));

        l.boot = boot(Firmware::UefiSecureBoot, Some("/w/nvram.fd"));
        let s = joined(&qemu_args(&l, BlockMode::VhostUser, None, &host).unwrap());
        assert!(
            s.contains("q35,memory-backend=mem,graphics=off,smm=on"),
            "{s}"
        );
        assert!(s.contains("driver=cfi.pflash01,property=secure,value=on"));
        assert!(s.contains(&format!(
            "unit=0,file={d}/OVMF_CODE_4M.secboot.fd,readonly=on"
        )));

        // A UEFI boot without its own NVRAM, or without OVMF, is an error, not a BIOS boot.
        l.boot = boot(Firmware::Uefi, None);
        let e = qemu_args(&l, BlockMode::VhostUser, None, &host).unwrap_err();
        assert!(e.to_string().contains("NVRAM"), "{e}");
        l.boot = boot(Firmware::Uefi, Some("/w/nvram.fd"));
        let e = qemu_args(&l, BlockMode::VhostUser, None, &HostFirmware::default()).unwrap_err();
        assert!(e.to_string().contains("OVMF_CODE_4M.fd"), "{e}");
    }

    #[test]
    fn an_iso_install_gets_cds_after_the_sata_disks_a_floppy_and_a_screen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bios-256k.bin"), b"x").unwrap();
        let host = HostFirmware::find_in(dir.path(), dir.path());
        let args_of = |l: &VmLaunch, block, vsock| qemu_args(l, block, vsock, &host).unwrap();
        let mut l = launch();
        let direct = l.boot.clone();
        l.boot = BootMode::Firmware(crate::engine::FirmwareBoot {
            firmware: crate::job::Firmware::Bios,
            nvram: None,
        });
        l.disks[0].bus = DiskBus::Sata;
        l.peripherals = crate::engine::Peripherals {
            cdroms: vec!["/c/install,er.iso".into(), "/c/drivers.iso".into()],
            floppy: Some("/w/floppy.img".into()),
            screen: true,
            console: false,
        };
        let s = joined(&args_of(&l, BlockMode::VhostUser, None));
        // The disk boots first, then the first CD; CDs take the AHCI ports after the disks.
        assert!(
            s.contains("ide-hd,drive=d0,bus=ide.0,serial=root,bootindex=0"),
            "{s}"
        );
        assert!(
            s.contains("if=none,id=cd0,media=cdrom,readonly=on,format=raw,file=/c/install,,er.iso"),
            "{s}"
        );
        assert!(s.contains("ide-cd,drive=cd0,bus=ide.1,bootindex=1"), "{s}");
        assert!(s.contains("ide-cd,drive=cd1,bus=ide.2 "), "{s}");
        assert!(
            s.contains("if=none,id=fd0,format=raw,file=/w/floppy.img"),
            "{s}"
        );
        assert!(s.contains("isa-fdc,id=fdc0 -device floppy,unit=0,drive=fd0,drive-type=144"));
        assert!(s.contains("-device VGA,addr=0x1e"), "{s}");
        // A virtio boot disk gets the first boot index as well.
        l.disks[0].bus = DiskBus::Virtio;
        let s = joined(&args_of(&l, BlockMode::VhostUser, None));
        assert!(s.contains("num-queues=1,bootindex=0"), "{s}");
        // A direct boot has no boot order: QEMU's `-kernel` ROM takes the first index.
        let kernel = VmLaunch {
            boot: direct,
            ..l.clone()
        };
        let s = joined(&args_of(&kernel, BlockMode::VhostUser, None));
        assert!(
            s.contains("ide-cd,drive=cd0") && !s.contains("bootindex"),
            "{s}"
        );
        // Six ports: five sata disks leave room for one CD only.
        l.disks = (0..5)
            .map(|i| DiskAttach {
                name: format!("d{i}"),
                path: format!("/w/d{i}.qcow2").into(),
                read_only: false,
                bus: DiskBus::Sata,
            })
            .collect();
        let e = qemu_args(&l, BlockMode::VhostUser, None, &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("7 sata disks and CD-ROMs"), "{e}");
        // Without peripherals, no screen and no boot order.
        let s = joined(&args_of(&launch(), BlockMode::VhostUser, None));
        assert!(!s.contains("VGA") && !s.contains("bootindex"), "{s}");
    }

    #[test]
    fn a_visible_screen_gets_a_vnc_server_on_a_socket_with_a_password() {
        let mut l = launch();
        let vnc = "-object secret,id=vncsec0,file=/w/vnc.pass \
                   -vnc unix:/w/vnc.sock,password-secret=vncsec0";
        for (screen, console, has_vnc) in [
            (true, true, true),
            // `invisible`: a screen for boot commands, but no console.
            (true, false, false),
            // No screen, nothing to show.
            (false, true, false),
            (false, false, false),
        ] {
            l.peripherals.screen = screen;
            l.peripherals.console = console;
            let s = joined(&args_of(&l, BlockMode::VhostUser, None));
            assert_eq!(s.contains(vnc), has_vnc, "{screen} {console}: {s}");
            assert_eq!(s.contains("-vnc"), has_vnc, "{s}");
            assert_eq!(s.contains("-device VGA,addr=0x1e"), screen, "{s}");
            // The VNC server never replaces `-display none`: QEMU opens no window.
            assert!(s.contains("-display none"), "{s}");
        }
    }

    #[test]
    fn scsi_and_sata_disks_are_nbd_exports_on_their_controllers() {
        let mut l = launch();
        for (name, bus) in [
            ("data", DiskBus::Scsi),
            ("logs", DiskBus::Scsi),
            ("old", DiskBus::Sata),
            ("older", DiskBus::Sata),
        ] {
            l.disks.push(DiskAttach {
                name: name.into(),
                path: format!("/w/{name}.qcow2").into(),
                read_only: false,
                bus,
            });
        }
        let args = args_of(&l, BlockMode::VhostUser, None);
        let s = joined(&args);
        // The boot disk stays on kiln's vhost-user-blk; only disk 0 has a vhost-user socket.
        assert!(
            s.contains("vhost-user-blk-pci,chardev=blk0,num-queues=1"),
            "{s}"
        );
        assert!(!s.contains("blk1"), "{s}");
        assert_eq!(s.matches("virtio-scsi-pci,id=scsi0").count(), 1, "{s}");
        for (i, name) in [(1, "data"), (2, "logs"), (3, "old"), (4, "older")] {
            let node = args
                .iter()
                .position(|x| x == "-blockdev")
                .and_then(|at| {
                    args[at..]
                        .iter()
                        .filter_map(|x| serde_json::from_str::<serde_json::Value>(x.to_str()?).ok())
                        .find(|v| v["node-name"] == format!("d{i}"))
                })
                .unwrap_or_else(|| panic!("no blockdev for d{i}: {s}"));
            assert_eq!(node["driver"], "nbd");
            assert_eq!(node["server"]["type"], "unix");
            assert_eq!(node["server"]["path"], format!("/w/nbd{i}.sock"));
            assert_eq!(node["export"], "");
            assert_eq!(node["read-only"], false);
            let device = match i {
                1 | 2 => format!("scsi-hd,drive=d{i},bus=scsi0.0,serial={name}"),
                _ => format!("ide-hd,drive=d{i},bus=ide.{},serial={name}", i - 3),
            };
            assert!(s.contains(&device), "{device} in {s}");
        }
        // Under the debugging block mode too, QEMU never opens these disks' files.
        let s = joined(&args_of(&l, BlockMode::QemuDrive, None));
        assert!(
            !s.contains("/w/data.qcow2") && s.contains("/w/nbd1.sock"),
            "{s}"
        );
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
                model: NicModel::Virtio,
            });
        }
        let s = joined(&args_of(&l, BlockMode::VhostUser, None));
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
        assert!(!joined(&args_of(&launch(), BlockMode::VhostUser, None)).contains("netdev"));
    }

    #[test]
    fn emulated_nics_are_stream_netdevs_with_the_same_mac() {
        let mut l = launch();
        // A comma in the path is doubled: QEMU's option syntax would split at it.
        l.workdir = "/w/a,b".into();
        let (port, _other) = kiln_net::port_pair(4).unwrap();
        let port: std::sync::Arc<dyn kiln_net::FramePort> = std::sync::Arc::new(port);
        for (i, model) in [NicModel::Virtio, NicModel::E1000, NicModel::E1000e]
            .into_iter()
            .enumerate()
        {
            l.nics.push(crate::engine::NicAttach {
                name: format!("eth{i}"),
                mac: [0x02, 0x6b, 0x6c, 0, 0, i as u8],
                port: port.clone(),
                model,
            });
        }
        let a: Vec<String> = args_of(&l, BlockMode::VhostUser, None)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            a.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(
            after("-netdev"),
            [
                "vhost-user,id=n0,chardev=net0",
                "stream,id=n1,server=off,addr.type=unix,addr.path=/w/a,,b/net1.stream.sock",
                "stream,id=n2,server=off,addr.type=unix,addr.path=/w/a,,b/net2.stream.sock",
            ]
        );
        let nic_devices: Vec<&str> = after("-device")
            .into_iter()
            .filter(|d| d.contains("netdev="))
            .collect();
        assert_eq!(
            nic_devices,
            [
                "virtio-net-pci,netdev=n0,mac=02:6b:6c:00:00:00,vectors=0",
                "e1000,netdev=n1,mac=02:6b:6c:00:00:01",
                "e1000e,netdev=n2,mac=02:6b:6c:00:00:02",
            ]
        );
        // Only the virtio NIC has a vhost-user chardev.
        assert_eq!(
            after("-chardev")
                .iter()
                .filter(|c| c.starts_with("socket,id=net"))
                .count(),
            1
        );
    }
}
