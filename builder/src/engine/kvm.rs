//! The `kvm` engine: kiln's own VMM on /dev/kvm, one process per VM. kiln re-executes itself
//! as `kiln __vmm` ([`kiln_vmm::process`]) with a [`VmSpec`] made from the [`VmLaunch`]
//! ([`vm_spec`]): the same disks (the NoCloud seed read-only, each with its name as serial),
//! the vsock device on the same Unix socket as under the `qemu` engine
//! (`<workdir>/vsock.sock`, `CONNECT <port>`), and one virtio-net NIC per [`NicAttach`].
//!
//! - NICs: the module switch lives in this process, the NIC in the VMM child. Each NIC gets
//!   a `SOCK_SEQPACKET` socket pair (one frame per message, [`kiln_net::SeqpacketPort`]);
//!   the child inherits one end (close-on-exec is cleared for that descriptor only, between
//!   fork and exec, and the spec names its number), and a relay thread here moves frames
//!   between the other end and the switch port. The pair lives as long as the VM, so a
//!   restarted VMM inherits the same socket.
//! - Reboots: a guest reset ends the VMM process with [`ExitReason::Reset`]. A supervisor
//!   thread then starts a fresh VMM with the same spec (same vsock socket path, same NIC
//!   sockets, same serial log), so the build's reboot step finds the agent again where it
//!   was. Any other end (power-off, a crash, a kill) is recorded for
//!   [`RunningVm::wait_exit`]. Resets are capped ([`MAX_RESETS`]) so a guest that panics
//!   and reboots in a loop (`panic=-1`) ends instead of spinning until the boot timeout.
//! - Lifetime: every VMM runs in its own process group (the terminal's Ctrl-C reaches kiln
//!   alone, which stops VMs in order) and dies with the supervisor thread that started it
//!   (`PR_SET_PDEATHSIG`), so none outlives kiln. [`RunningVm::kill`] kills the current VMM
//!   through a pidfd (no pid-reuse race) and joins the supervisor and relays.
//! - Diagnostics: the VMM's stderr goes to `<workdir>/vmm.stderr` ([`stderr_tail`]); each
//!   time a VMM ends, a `[kiln kvm]` line with its exit reason is appended to the serial log,
//!   so a build that times out waiting for the agent shows why the VM went away.

use crate::path_io::PathIoError;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_net::{FramePort, PortError, SeqpacketPort, MAX_FRAME};
use kiln_vmm::exit::ExitReason;
use kiln_vmm::process::protocol::{exit_code, CheckpointSpec, DiskSpec, NicSpec, VsockSpec};
use kiln_vmm::process::{VmProcess, VmSpec, CHILD_SUBCOMMAND};

use crate::step_cache::{CheckpointDisk, VmmDisk};

use super::{vsock_uds, BootMode, Engine, EngineError, NicAttach, RunningVm, VmLaunch};

pub use super::MAX_RESETS;

/// The serial (GET_ID) virtio-blk carries at most 20 bytes.
const SERIAL_MAX: usize = 20;

pub struct KvmEngine {
    exe: PathBuf,
    /// Where the step cache keeps layers: the VMM takes checkpoints of layers there only
    /// (None: no checkpoints).
    layer_root: Option<PathBuf>,
}

impl KvmEngine {
    /// The engine running this very binary as the VMM (`kiln __vmm`). Fails clearly when
    /// /dev/kvm cannot be opened.
    pub fn new() -> Result<Self, EngineError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| EngineError::Missing {
                program: "/dev/kvm".into(),
                hint: format!("{e}; `kiln doctor` explains, `--engine qemu` runs without it"),
            })?;
        let exe = std::env::current_exe().map_err(|source| EngineError::Spawn {
            what: "finding the kiln binary to run the VMM".into(),
            source,
        })?;
        Ok(Self::with_exe(exe))
    }

    /// The engine running `exe __vmm ...` as the VMM (tests pass the `kiln` binary).
    pub fn with_exe(exe: PathBuf) -> Self {
        Self {
            exe,
            layer_root: None,
        }
    }

    /// Lets the VMM take live checkpoints of layers under `root` (the cache's folder).
    pub fn with_layer_root(mut self, root: Option<PathBuf>) -> Self {
        self.layer_root = root;
        self
    }
}

/// The VMM's checkpoint socket for a VM (the same path for every VMM the VM runs in).
pub fn checkpoint_socket(workdir: &Path) -> PathBuf {
    workdir.join("checkpoint.sock")
}

/// The VMM's control socket for a VM.
pub fn control_socket(workdir: &Path) -> PathBuf {
    workdir.join("vmm.sock")
}

/// The spec the VMM child runs for `vm`, with NIC `i` on the inherited descriptor
/// `nic_fds[i]`. Public for tests and inspection.
pub fn vm_spec(vm: &VmLaunch, nic_fds: &[RawFd]) -> Result<VmSpec, EngineError> {
    if let Some(why) = super::kvm_cannot_run(
        &vm.name,
        vm.disks.iter().map(|d| (&*d.name, d.bus)),
        vm.nics.iter().map(|n| (&*n.name, n.model)),
    ) {
        return Err(EngineError::Backend(format!("{why}: use --engine qemu")));
    }
    if !vm.peripherals.is_empty() {
        return Err(EngineError::Backend(
            "it has CD-ROMs, a floppy or a screen (an ISO install), and the kvm engine \
             (kiln-vmm) has none of them: use --engine qemu"
                .into(),
        ));
    }
    let boot = match &vm.boot {
        BootMode::Direct(boot) => boot,
        BootMode::Firmware(fw) => {
            return Err(EngineError::Backend(format!(
                "it boots through {} firmware, and the kvm engine (kiln-vmm) boots only a \
                 kernel directly: use --engine qemu",
                fw.firmware.as_str()
            )))
        }
    };
    let vcpus = u8::try_from(vm.cpus.max(1))
        .ok()
        .filter(|n| *n <= kiln_vmm::vm::MAX_VCPUS)
        .ok_or_else(|| {
            EngineError::Backend(format!(
                "{} vCPUs: the kvm engine runs 1..={}",
                vm.cpus,
                kiln_vmm::vm::MAX_VCPUS
            ))
        })?;
    let mem_size = vm
        .memory_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| EngineError::Backend(format!("{} MiB of memory", vm.memory_mib)))?;
    if nic_fds.len() != vm.nics.len() {
        return Err(EngineError::Backend(format!(
            "{} NIC descriptors for {} NICs",
            nic_fds.len(),
            vm.nics.len()
        )));
    }
    Ok(VmSpec {
        kernel: boot.kernel.clone(),
        initrd: boot.initrd.clone(),
        cmdline: Some(vm.cmdline(boot)),
        disks: vm
            .disks
            .iter()
            .map(|d| DiskSpec {
                path: d.path.clone(),
                read_only: d.read_only,
                serial: d.name.chars().take(SERIAL_MAX).collect(),
            })
            .collect(),
        mem_size,
        vcpus,
        console_log: Some(vm.serial_log.clone()),
        console_terminal: false,
        nics: vm
            .nics
            .iter()
            .zip(nic_fds)
            .map(|(n, fd)| NicSpec {
                mac: n.mac,
                fd: *fd,
            })
            .collect(),
        vsock: Some(VsockSpec {
            guest_cid: vm.cid,
            uds_path: vsock_uds(&vm.workdir),
        }),
        checkpoint: None,
    })
}

impl Engine for KvmEngine {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn launch(&self, vm: &VmLaunch) -> Result<Box<dyn RunningVm>, EngineError> {
        vm.create_workdir()?;
        let stderr_path = vm.workdir.join("vmm.stderr");
        std::fs::File::create(&stderr_path).map_err(PathIoError::at("creating", &stderr_path))?;
        // One socket pair per NIC for the VM's whole life.
        let mut child_ends = Vec::new();
        let mut relays = Vec::new();
        let (stop_tx, stop_rx) = UnixStream::pair().map_err(|source| EngineError::Spawn {
            what: "a relay stop socket".into(),
            source,
        })?;
        for nic in &vm.nics {
            let (here, there) =
                kiln_net::seqpacket_pair().map_err(|source| EngineError::Spawn {
                    what: format!("the frame socket of NIC {}", nic.name),
                    source,
                })?;
            relays.push(spawn_relay(nic, here, &stop_rx)?);
            child_ends.push(there);
        }
        let fds: Vec<RawFd> = child_ends.iter().map(|p| p.as_raw_fd()).collect();
        let mut spec = vm_spec(vm, &fds)?;
        spec.checkpoint = self.layer_root.as_ref().map(|root| CheckpointSpec {
            socket: checkpoint_socket(&vm.workdir),
            layer_root: root.clone(),
        });
        let checkpoint_disks = match &spec.checkpoint {
            Some(c) => vm
                .disks
                .iter()
                .enumerate()
                .filter(|(_, d)| !d.read_only)
                .map(|(index, d)| {
                    Arc::new(VmmDisk {
                        socket: c.socket.clone(),
                        index,
                        path: d.path.clone(),
                    }) as Arc<dyn CheckpointDisk>
                })
                .collect(),
            None => Vec::new(),
        };
        let shared = Arc::new(Shared::new(State::default()));
        let sup = Supervisor {
            exe: self.exe.clone(),
            spec,
            name: vm.name.clone(),
            control: control_socket(&vm.workdir),
            stderr_path: stderr_path.clone(),
            serial_log: vm.serial_log.clone(),
            nic_fds: fds,
            shared: shared.clone(),
        };
        let (first_tx, first_rx) = mpsc::channel();
        let supervisor = std::thread::Builder::new()
            .name(format!("kiln-kvm-{}", vm.name))
            .spawn(move || {
                sup.run(first_tx);
                // The child ends stay open until no VMM can be started any more.
                drop(child_ends);
            })
            .map_err(|source| EngineError::Spawn {
                what: "the VM supervisor thread".into(),
                source,
            })?;
        let mut running = KvmVm {
            shared,
            supervisor: Some(supervisor),
            relays,
            stop_relays: Some(stop_tx),
            vsock: vsock_uds(&vm.workdir),
            checkpoint_disks,
        };
        match first_rx.recv() {
            Ok(Ok(())) => Ok(Box::new(running)),
            Ok(Err(e)) => {
                running.kill();
                let tail = stderr_tail(&vm.workdir);
                Err(EngineError::Backend(if tail.is_empty() {
                    e
                } else {
                    format!("{e}\nVMM stderr:\n{tail}")
                }))
            }
            Err(_) => {
                running.kill();
                Err(EngineError::Backend(
                    "the VM supervisor ended before the VM started".into(),
                ))
            }
        }
    }
}

/// The last lines of the VMM's stderr for a VM (for error messages).
pub fn stderr_tail(workdir: &Path) -> String {
    let t = std::fs::read_to_string(workdir.join("vmm.stderr")).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// How the VM ended, for `wait_exit`.
#[derive(Debug, Clone)]
struct Ended {
    reason: ExitReason,
    status: ExitStatus,
}

#[derive(Default)]
struct State {
    /// The VMM process running now: its pid and a pidfd to signal it by.
    current: Option<(u32, Option<OwnedFd>)>,
    /// `kill` was called: start nothing more.
    stopping: bool,
    ended: Option<Ended>,
}

type Shared = super::supervised::Supervised<State>;

struct Supervisor {
    exe: PathBuf,
    spec: VmSpec,
    name: String,
    control: PathBuf,
    stderr_path: PathBuf,
    serial_log: PathBuf,
    nic_fds: Vec<RawFd>,
    shared: Arc<Shared>,
}

impl Supervisor {
    /// Start VMMs until one ends otherwise than by a reset; tell `first` whether the first
    /// one started.
    fn run(self, first: mpsc::Sender<Result<(), String>>) {
        let mut first = Some(first);
        let mut resets = 0u32;
        let ended = loop {
            if self.shared.lock().stopping {
                break ExitReason::Stopped;
            }
            let started = self.start_one();
            let mut p = match started {
                Ok(p) => p,
                Err(e) => {
                    self.shared.lock().current = None;
                    let reason = ExitReason::VmmError { detail: e.clone() };
                    match first.take() {
                        Some(tx) => {
                            let _ = tx.send(Err(e));
                        }
                        None => self.note(&format!("starting a fresh VMM failed: {e}")),
                    }
                    break reason;
                }
            };
            if let Some(tx) = first.take() {
                let _ = tx.send(Ok(()));
            }
            let pid = p.pid();
            let reason = p.wait().unwrap_or_else(|e| ExitReason::VmmError {
                detail: e.to_string(),
            });
            drop(p);
            let stopping = {
                let mut st = self.shared.lock();
                st.current = None;
                st.stopping
            };
            if reason == ExitReason::Reset && !stopping {
                resets += 1;
                if resets > MAX_RESETS {
                    self.note(&format!(
                        "VMM {pid} ended: {reason}; {MAX_RESETS} resets already, not restarting"
                    ));
                    break reason;
                }
                self.note(&format!("VMM {pid} ended: {reason}; starting a fresh VMM"));
                tracing::info!(vm = %self.name, "guest reset: starting a fresh VMM");
                continue;
            }
            if !stopping {
                self.note(&format!("VMM {pid} ended: {reason}"));
            }
            break reason;
        };
        tracing::debug!(vm = %self.name, "VM ended: {ended}");
        let status = ExitStatus::from_raw(exit_code(&ended) << 8);
        let mut st = self.shared.lock();
        st.ended = Some(Ended {
            reason: ended,
            status,
        });
        self.shared.notify();
    }

    /// Spawn one VMM process and boot its VM.
    fn start_one(&self) -> Result<VmProcess, String> {
        let spec = serde_json::to_string(&self.spec).map_err(|e| e.to_string())?;
        let stderr = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.stderr_path)
            .map_err(|e| format!("opening {}: {e}", self.stderr_path.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(CHILD_SUBCOMMAND)
            .arg("--socket")
            .arg(&self.control)
            .arg("--spec")
            .arg(spec)
            .stdout(Stdio::null())
            .stderr(stderr);
        let nic_fds = self.nic_fds.clone();
        // SAFETY: only async-signal-safe calls (setpgid, prctl, fcntl) run between fork and
        // exec, on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // Own process group: the terminal's Ctrl-C goes to kiln, which stops VMs in
                // order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the supervisor thread that started us, whatever happens to kiln.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The NICs' sockets, and only them, cross the exec.
                for fd in &nic_fds {
                    SeqpacketPort::inheritable(*fd)?;
                }
                Ok(())
            });
        }
        let mut p = VmProcess::spawn_command(cmd, &self.control, false)
            .map_err(|e| format!("starting the VMM process {}: {e}", self.exe.display()))?;
        {
            let mut st = self.shared.lock();
            st.current = Some((p.pid(), pidfd_open(p.pid())));
            if st.stopping {
                // `kill` came while this VMM started; dropping `p` kills it.
                st.current = None;
                return Err("the VM was stopped while its VMM started".into());
            }
        }
        p.start()
            .map_err(|e| format!("the VMM could not boot the VM: {e}"))?;
        Ok(p)
    }

    /// Append a line to the serial log: what happened to the VMM, next to what the guest
    /// printed last.
    fn note(&self, text: &str) {
        let line = format!("\n[kiln kvm] {text}\n");
        let r = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.serial_log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(vm = %self.name, "{}: {e}", self.serial_log.display());
        }
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn kill_process(pid: u32, pidfd: Option<&OwnedFd>) {
    match pidfd {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number and no siginfo.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        },
        // Without pidfds (kernels before 5.3): a plain kill. The supervisor clears `current`
        // right after reaping, so only a pid reused within that instant could be hit.
        // SAFETY: kill takes no pointers.
        None => unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        },
    }
}

/// Moves frames both ways between the NIC's socket (the VMM child's end is on the other
/// side) and its switch port, until `stop` becomes readable (its peer is dropped).
fn spawn_relay(
    nic: &NicAttach,
    here: SeqpacketPort,
    stop: &UnixStream,
) -> Result<JoinHandle<()>, EngineError> {
    let port = nic.port.clone();
    let stop = stop.try_clone().map_err(|source| EngineError::Spawn {
        what: "a relay stop socket".into(),
        source,
    })?;
    let name = nic.name.clone();
    std::thread::Builder::new()
        .name(format!("kiln-kvm-nic-{name}"))
        .spawn(move || relay(&name, &here, &*port, &stop))
        .map_err(|source| EngineError::Spawn {
            what: format!("the relay thread of NIC {}", nic.name),
            source,
        })
}

/// Frames moved per direction before the other direction gets a turn.
const BATCH: usize = 64;

fn relay(name: &str, vm: &SeqpacketPort, net: &dyn FramePort, stop: &UnixStream) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut net_open = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vm.rx_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // A closed switch port stays readable: stop watching it.
                fd: if net_open { net.rx_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: three valid pollfds in a live array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(nic = name, "relay poll: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            for _ in 0..BATCH {
                match vm.recv(&mut buf) {
                    Ok(Some(len)) => {
                        if net_open {
                            if let Err(e) = net.send(&buf[..len]) {
                                tracing::debug!(nic = name, "to the network: {e}");
                                net_open = !matches!(e, PortError::Closed);
                            }
                        }
                    }
                    Ok(None) => break,
                    // An oversize frame from the guest: dropped, as a switch would.
                    Err(PortError::TooLarge(n)) => {
                        tracing::debug!(nic = name, "dropped a {n}-byte frame from the VM")
                    }
                    Err(e) => {
                        // The supervisor holds the child's side open while VMMs may run, so
                        // this is the VM's end; nothing more can cross this NIC.
                        tracing::debug!(nic = name, "VM side of the NIC: {e}");
                        return;
                    }
                }
            }
        }
        if net_open && fds[2].revents != 0 {
            for _ in 0..BATCH {
                match net.recv(&mut buf) {
                    Ok(Some(len)) => {
                        if let Err(e) = vm.send(&buf[..len]) {
                            tracing::debug!(nic = name, "to the VM: {e}");
                        }
                    }
                    Ok(None) => break,
                    Err(PortError::TooLarge(n)) => {
                        tracing::debug!(nic = name, "dropped a {n}-byte frame from the network")
                    }
                    Err(e) => {
                        tracing::debug!(nic = name, "network side of the NIC: {e}");
                        net_open = false;
                        break;
                    }
                }
            }
        }
    }
}

struct KvmVm {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
    relays: Vec<JoinHandle<()>>,
    stop_relays: Option<UnixStream>,
    vsock: PathBuf,
    /// The writable disks, swapped by the VMM running at the time.
    checkpoint_disks: Vec<Arc<dyn CheckpointDisk>>,
}

impl KvmVm {
    fn stop_relays(&mut self) {
        // Dropping the last write side makes every relay's stop socket readable.
        self.stop_relays = None;
        for r in self.relays.drain(..) {
            let _ = r.join();
        }
    }
}

impl RunningVm for KvmVm {
    fn vsock_socket(&self) -> &Path {
        &self.vsock
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let Some(e) = self.shared.wait_for(timeout, |st| st.ended.clone()) else {
            return Ok(None);
        };
        if !e.status.success() {
            tracing::warn!("the VM ended: {}", e.reason);
        }
        self.stop_relays();
        Ok(Some(e.status))
    }

    fn is_running(&mut self) -> bool {
        self.shared.lock().ended.is_none()
    }

    fn kill(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stopping = true;
            if let Some((pid, fd)) = &st.current {
                kill_process(*pid, fd.as_ref());
            }
        }
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        self.stop_relays();
    }

    fn checkpoint_disks(&self) -> Vec<Arc<dyn CheckpointDisk>> {
        self.checkpoint_disks.clone()
    }

    fn pids(&self) -> Vec<u32> {
        self.shared
            .lock()
            .current
            .as_ref()
            .map(|(pid, _)| vec![*pid])
            .unwrap_or_default()
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DiskAttach;
    use crate::sources::BootFiles;
    use std::time::Instant;

    fn launch(nics: Vec<NicAttach>) -> VmLaunch {
        VmLaunch {
            name: "web".into(),
            cpus: 2,
            memory_mib: 1024,
            boot: BootMode::Direct(BootFiles {
                kernel: "/c/vmlinuz".into(),
                initrd: Some("/c/initrd.img".into()),
                root: "/dev/vda1".into(),
                args: vec![],
            }),
            cmdline_extra: vec!["quiet".into()],
            disks: vec![
                DiskAttach {
                    name: "root".into(),
                    path: "/w/root.qcow2".into(),
                    read_only: false,
                    bus: Default::default(),
                },
                DiskAttach {
                    name: "cidata-seed-with-a-long-name".into(),
                    path: "/w/seed.img".into(),
                    read_only: true,
                    bus: Default::default(),
                },
            ],
            workdir: "/w".into(),
            serial_log: "/l/web-serial.log".into(),
            cid: 7,
            peripherals: Default::default(),
            nics,
        }
    }

    fn nic(i: u8) -> NicAttach {
        let (port, _other) = kiln_net::port_pair(4).unwrap();
        NicAttach {
            name: format!("eth{i}"),
            mac: [0x02, 0x6b, 0x6c, 0, 0, i],
            port: Arc::new(port),
            model: Default::default(),
        }
    }

    #[test]
    fn a_firmware_boot_is_refused_with_the_reason() {
        let mut l = launch(vec![]);
        l.boot = BootMode::Firmware(crate::engine::FirmwareBoot {
            firmware: crate::job::Firmware::Uefi,
            nvram: Some("/w/nvram.fd".into()),
        });
        let e = vm_spec(&l, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("it boots through uefi firmware") && e.contains("--engine qemu"),
            "{e}"
        );
    }

    #[test]
    fn a_disk_on_another_bus_than_virtio_is_refused_with_its_names() {
        let mut l = launch(vec![]);
        l.disks[0].bus = crate::job::DiskBus::Scsi;
        let e = vm_spec(&l, &[]).unwrap_err().to_string();
        assert!(
            e.contains("VM `web`") && e.contains("disk `root`") && e.contains("virtio-blk"),
            "{e}"
        );
    }

    #[test]
    fn an_emulated_nic_is_refused_with_its_names() {
        let mut n = nic(1);
        n.model = crate::job::NicModel::E1000;
        let l = launch(vec![nic(0), n]);
        let e = vm_spec(&l, &[40, 41]).unwrap_err().to_string();
        assert!(
            e.contains("VM `web`: NIC `eth1` is model `e1000`")
                && e.contains("virtio-net")
                && e.contains("--engine qemu"),
            "{e}"
        );
    }

    #[test]
    fn spec_carries_disks_seed_vsock_nics_and_resources() {
        let l = launch(vec![nic(0), nic(1)]);
        let s = vm_spec(&l, &[40, 41]).unwrap();
        assert_eq!(s.kernel, Path::new("/c/vmlinuz"));
        assert_eq!(s.initrd.as_deref(), Some(Path::new("/c/initrd.img")));
        let cmd = s.cmdline.clone().unwrap();
        let BootMode::Direct(boot) = &l.boot else {
            unreachable!()
        };
        assert_eq!(cmd, l.cmdline(boot));
        assert!(
            cmd.starts_with("root=/dev/vda1 rw console=ttyS0 systemd.hostname=web"),
            "{cmd}"
        );
        assert!(cmd.ends_with(" quiet"), "{cmd}");
        // ACPI describes the virtio-mmio devices: no virtio_mmio.device= declarations.
        assert!(!cmd.contains("virtio_mmio"), "{cmd}");
        assert_eq!(s.mem_size, 1024 << 20);
        assert_eq!(s.vcpus, 2);
        assert_eq!(
            s.console_log.as_deref(),
            Some(Path::new("/l/web-serial.log"))
        );
        assert!(!s.console_terminal);
        assert_eq!(
            s.disks,
            vec![
                DiskSpec {
                    path: "/w/root.qcow2".into(),
                    read_only: false,
                    serial: "root".into(),
                },
                DiskSpec {
                    path: "/w/seed.img".into(),
                    read_only: true,
                    serial: "cidata-seed-with-a-l".into(),
                },
            ]
        );
        assert_eq!(
            s.vsock,
            Some(VsockSpec {
                guest_cid: 7,
                uds_path: "/w/vsock.sock".into(),
            })
        );
        assert_eq!(
            s.nics,
            vec![
                NicSpec {
                    mac: [0x02, 0x6b, 0x6c, 0, 0, 0],
                    fd: 40
                },
                NicSpec {
                    mac: [0x02, 0x6b, 0x6c, 0, 0, 1],
                    fd: 41
                },
            ]
        );
        // The socket the builder connects to is the qemu engine's.
        assert_eq!(s.vsock.unwrap().uds_path, vsock_uds(&l.workdir));
    }

    #[test]
    fn spec_refuses_what_the_vmm_cannot_run() {
        let mut l = launch(vec![nic(0)]);
        assert!(vm_spec(&l, &[]).is_err(), "a NIC without its descriptor");
        l.cpus = 300;
        let e = vm_spec(&l, &[40]).unwrap_err().to_string();
        assert!(e.contains("300 vCPUs"), "{e}");
        l.cpus = 0;
        assert_eq!(vm_spec(&l, &[40]).unwrap().vcpus, 1);
        l.memory_mib = u64::MAX;
        assert!(vm_spec(&l, &[40]).is_err());
    }

    fn relay_rig() -> (
        SeqpacketPort,
        kiln_net::QueuePort,
        UnixStream,
        JoinHandle<()>,
    ) {
        let (vm_side, here) = kiln_net::seqpacket_pair().unwrap();
        let (net_side, switch) = kiln_net::port_pair(64).unwrap();
        let n = NicAttach {
            name: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            port: Arc::new(net_side),
            model: Default::default(),
        };
        let (stop_tx, stop_rx) = UnixStream::pair().unwrap();
        let t = spawn_relay(&n, here, &stop_rx).unwrap();
        (vm_side, switch, stop_tx, t)
    }

    fn recv_within(p: &dyn FramePort, buf: &mut [u8]) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(n) = p.recv(buf).unwrap() {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    #[test]
    fn relay_moves_frames_both_ways_and_stops() {
        let (vm, switch, stop, t) = relay_rig();
        let mut buf = [0u8; MAX_FRAME];
        for i in 0..200u8 {
            vm.send(&[i; 60]).unwrap();
            assert_eq!(recv_within(&switch, &mut buf), Some(60));
            assert_eq!(buf[0], i, "in order");
            switch.send(&[i; 1514]).unwrap();
            assert_eq!(recv_within(&vm, &mut buf), Some(1514));
            assert_eq!(buf[1513], i);
        }
        drop(stop);
        t.join().unwrap();
    }

    #[test]
    fn relay_survives_the_network_going_away() {
        let (vm, switch, stop, t) = relay_rig();
        drop(switch);
        // Frames from the VM are dropped, not a busy loop or a crash.
        vm.send(&[1; 60]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(stop);
        t.join().unwrap();
    }

    #[test]
    fn a_vmm_that_cannot_start_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = launch(vec![]);
        l.workdir = dir.path().join("run");
        l.serial_log = dir.path().join("serial.log");
        let e = KvmEngine::with_exe("/nonexistent/kiln".into())
            .launch(&l)
            .err()
            .expect("no VMM binary")
            .to_string();
        assert!(
            e.contains("starting the VMM process /nonexistent/kiln"),
            "{e}"
        );
    }
}
