//! Boot: the engine picked for the build; each VM launched through it and waited for until
//! its agent answers; a failed VM stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::boot_command::{self, BootCommandError, HttpAddr, Typist};
use super::boot_failure;
use super::boot_path;
use super::error::{BuildError, VmError};
use super::media;
use super::registry::{Registered, SharedVm};
use super::source::VmDisks;
use super::vm::VmBuild;
use crate::engine::{self, DiskAttach, Engine, EngineChoice};
use crate::events::{Event, EventSink, VmPhase};
use crate::guest::{Connector, Guest, GuestError};
use crate::http_directory;
use crate::job::BuildJob;
use crate::launch::{self, VmStart};
use crate::sources;

/// The engine this build runs on: the one asked for, or the best this host has.
pub(super) fn pick_engine(
    choice: EngineChoice,
    job: &BuildJob,
    ev: &dyn EventSink,
    layers: &Path,
) -> Result<Arc<dyn Engine>, BuildError> {
    // A VM whose firmware boot is known now needs qemu as much as a disk or NIC kiln-vmm
    // cannot serve; one that needs firmware only once its source shows no kernel fails at its
    // launch under kvm, with the engine's reason.
    let needs_qemu = job.vms.iter().find_map(|v| {
        engine::kvm_cannot_run(
            &v.name,
            v.disks.iter().map(|d| (&*d.name, d.bus)),
            v.nics.iter().map(|n| (&*n.name, n.model)),
        )
        .or_else(|| boot_path::kvm_refusal(v))
        .or_else(|| media::kvm_refusal(v))
    });
    let probe = kiln_vmm::doctor::probe();
    let pick = engine::pick(choice, &probe, needs_qemu.as_deref());
    // Refused before anything is made, rather than when that VM's turn to boot comes.
    if let (EngineChoice::Kvm, Some(why)) = (pick.engine, &needs_qemu) {
        return Err(BuildError::Engine(engine::EngineError::Backend(format!(
            "{why}: use --engine qemu or auto"
        ))));
    }
    ev.emit(&Event::Note {
        vm: None,
        message: format!(
            "engine: {} ({})",
            match pick.engine {
                EngineChoice::Kvm => "kvm",
                _ => "qemu",
            },
            pick.why
        ),
    });
    Ok(Arc::from(engine::make_with_layers(
        pick.engine,
        Some(layers),
    )?))
}

/// A launched VM, registered so a cancel can stop it until this drops.
pub(super) struct Launched<'a> {
    pub running: SharedVm,
    /// The engine's vsock socket, where the agent answers.
    pub socket: PathBuf,
    /// The VM's own log (step output), open for appending.
    pub log: Mutex<fs::File>,
    /// When the VM was launched: `bootWait` counts from here.
    pub started: Instant,
    _registered: Registered<'a>,
}

/// Whether a VM runs on qemu although the build picked kvm: under `--engine auto`, a VM
/// found to need firmware only once its source resolved (an image without a kernel kiln can
/// read, a `buildRef` child of a module that booted through firmware) cannot run on kiln-vmm,
/// which boots only a kernel directly. With `--engine kvm` asked for, the engine refuses it.
fn falls_back_to_qemu(choice: EngineChoice, picked: &str, boot: &engine::BootMode) -> bool {
    choice == EngineChoice::Auto && picked == "kvm" && matches!(boot, engine::BootMode::Firmware(_))
}

pub(super) fn launch<'a>(b: &VmBuild<'a>, disks: &VmDisks) -> Result<Launched<'a>, VmError> {
    start_launched(b, disks, false)
}

/// Starts the VM again after it powered off, appending to its logs.
pub(super) fn relaunch<'a>(b: &VmBuild<'a>, disks: &VmDisks) -> Result<Launched<'a>, VmError> {
    start_launched(b, disks, true)
}

fn start_launched<'a>(
    b: &VmBuild<'a>,
    disks: &VmDisks,
    again: bool,
) -> Result<Launched<'a>, VmError> {
    let open_log = |path: &Path| {
        if again {
            crate::log_file::append(path)
        } else {
            crate::log_file::create(path)
        }
    };
    let qemu_instead;
    let engine: &dyn Engine =
        if falls_back_to_qemu(b.module.opts.engine, b.module.engine.name(), &disks.boot) {
            b.note(
                "boots through firmware, which the kvm engine cannot: this VM runs on qemu".into(),
            );
            qemu_instead = engine::make(EngineChoice::Qemu)
                .map_err(|e| VmError::Launch(launch::LaunchError::Engine(e)))?;
            qemu_instead.as_ref()
        } else {
            b.module.engine
        };
    b.phase(VmPhase::Booting, Some(engine.name().into()));
    let serial_log = b.serial_log();
    // Made here, 0600, so the engine appends to a file only its owner can read.
    open_log(&serial_log).map_err(|source| VmError::Log {
        path: serial_log.clone(),
        source,
    })?;
    let spec = VmStart {
        name: &b.vm.name,
        cpus: b.vm.cpus,
        memory_mib: b.vm.memory_mib,
        boot: disks.boot.clone(),
        disks: disks
            .disks
            .iter()
            .cloned()
            .chain(disks.seed.iter().map(|path| DiskAttach {
                name: sources::seed::LABEL.into(),
                path: path.clone(),
                read_only: true,
                bus: Default::default(),
            }))
            .collect(),
        nics: &b.vm.nics,
        workdir: b.runtime_dir(),
        serial_log,
        index: b.index,
        peripherals: peripherals(b, engine, &disks.peripherals),
    };
    let console = spec.peripherals.console;
    let running = start_vm(engine, b, spec, again)?;
    let started = Instant::now();
    if console {
        b.note(format!(
            "console: kiln console {}/{}",
            b.module.job.name, b.vm.name
        ));
    }
    let socket = running.vsock_socket().to_path_buf();
    let running: SharedVm = Arc::new(Mutex::new(running));
    let registered = b.module.ctx.registry.add(&b.vm.name, running.clone());

    let log_path = b.step_log();
    let log = open_log(&log_path)
        .map(Mutex::new)
        .map_err(|source| VmError::Log {
            path: log_path,
            source,
        })?;
    Ok(Launched {
        running,
        socket,
        log,
        started,
        _registered: registered,
    })
}

/// What a build VM gets besides its disks and NICs: its install media, and under qemu a
/// screen with a VNC console on it unless it is `invisible` (which keeps the screen for boot
/// commands and screenshots, out of every console view).
fn peripherals(
    b: &VmBuild,
    engine: &dyn Engine,
    media: &engine::Peripherals,
) -> engine::Peripherals {
    let screen = media.screen || engine.name() == "qemu";
    engine::Peripherals {
        screen,
        console: screen && !b.vm.invisible,
        ..media.clone()
    }
}

/// Starts the VM. Started `again` after a power-off, its NICs may not be free on the switch
/// yet (the switch sees the old ports close on its next turn): a few short retries then.
fn start_vm(
    engine: &dyn Engine,
    b: &VmBuild,
    spec: VmStart,
    again: bool,
) -> Result<Box<dyn engine::RunningVm>, launch::LaunchError> {
    let mut tries = 0;
    loop {
        let this_try = VmStart {
            workdir: spec.workdir.clone(),
            serial_log: spec.serial_log.clone(),
            boot: spec.boot.clone(),
            disks: spec.disks.clone(),
            peripherals: spec.peripherals.clone(),
            ..spec
        };
        match launch::start(engine, Some(b.module.net), this_try) {
            Err(launch::LaunchError::Nics(_)) if again && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Whether a VM that stopped before its communicator answered is an installer that powered
/// off, to be started again once from its disk: a VM with ISOs, on its first start, whose
/// guest ended it cleanly (not QEMU failing), in a build that goes on.
pub(super) fn restart_after_install(b: &VmBuild, vm: &Launched, e: &VmError, starts: u32) -> bool {
    if !matches!(e, VmError::Stopped { .. }) || b.vm.isos.is_empty() || starts != 1 {
        return false;
    }
    let exit = vm
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .wait_exit(Duration::ZERO);
    matches!(exit, Ok(Some(status)) if status.success()) && !b.cancelled()
}

/// Waits until the VM's agent answers, in short tries, so a cancel (Ctrl-C, the build
/// timeout, another VM's failure) ends the wait at once instead of after the whole boot
/// timeout. A VM that ends while booting (a crash, a kernel that cannot run, a reset loop)
/// ends the wait too, with the console's last lines.
pub(super) fn wait_for_agent(
    b: &VmBuild,
    vm: &Launched,
    connector: &dyn Connector,
    boot_command: bool,
) -> Result<Box<dyn Guest>, VmError> {
    let stop_wait = AtomicBool::new(false);
    let vm_gone = AtomicBool::new(false);
    let wait_over = AtomicBool::new(false);
    let boot_failed: Mutex<Option<String>> = Mutex::new(None);
    let typing_failed: Mutex<Option<BootCommandError>> = Mutex::new(None);
    let last_screenshot: Mutex<Option<PathBuf>> = Mutex::new(None);
    let waited = std::thread::scope(|s| {
        if boot_command && !b.vm.boot_command.is_empty() {
            s.spawn(|| {
                let stop = || b.cancelled() || wait_over.load(Ordering::SeqCst);
                let shot = |p: &Path| {
                    b.note(format!("boot command screenshot: {}", in_logs(p)));
                    *last_screenshot.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(p.to_path_buf());
                };
                if let Err(e) = type_boot_command(b, vm, &stop, &shot) {
                    if !stop() {
                        *typing_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        stop_wait.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
        s.spawn(|| {
            let mut console = ConsoleWatch::new(b.serial_log());
            while !wait_over.load(Ordering::SeqCst) {
                if b.cancelled() {
                    stop_wait.store(true, Ordering::SeqCst);
                    return;
                }
                if let Some(cause) = console.failure() {
                    *boot_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
                    stop_wait.store(true, Ordering::SeqCst);
                    return;
                }
                if !vm
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_running()
                {
                    vm_gone.store(true, Ordering::SeqCst);
                    stop_wait.store(true, Ordering::SeqCst);
                    return;
                }
                // Short: the scope below joins this thread before the steps start.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = connector.connect_until(b.vm.boot_timeout, &stop_wait, &mut |_| Ok(()));
        wait_over.store(true, Ordering::SeqCst);
        r
    });
    waited.map_err(|e| {
        let serial = serial_tail(&b.serial_log());
        let failed = boot_failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        let typing = typing_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let screenshot = last_screenshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|p| in_logs(&p))
            .unwrap_or_else(|| "none taken".into());
        if let Some(error) = typing {
            VmError::BootCommand {
                error,
                screenshot,
                serial,
            }
        } else if let Some(cause) = failed {
            VmError::BootFailed { cause, serial }
        } else if vm_gone.load(Ordering::SeqCst) {
            VmError::Stopped { serial }
        } else if !b.vm.boot_command.is_empty() {
            VmError::NoAgentAfterBootCommand {
                error: GuestError::from(e),
                screenshot,
                serial,
            }
        } else {
            VmError::NoAgent {
                error: GuestError::from(e),
                serial,
            }
        }
    })
}

/// A screenshot as the module's (or a failed build's kept) logs hold it: the partial module
/// it is written in is renamed when the build ends.
fn in_logs(p: &Path) -> String {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    format!("logs/{name}")
}

/// Types the VM's boot command (after `bootWait`, counted from its launch), telling of each
/// screenshot with `shot`.
fn type_boot_command(
    b: &VmBuild,
    vm: &Launched,
    stop: &(dyn Fn() -> bool + Sync),
    shot: &(dyn Fn(&Path) + Sync),
) -> Result<(), BootCommandError> {
    let http =
        b.vm.nics
            .first()
            .and_then(|n| b.module.net.gateway(&n.subnet))
            .map(|ip| HttpAddr {
                ip,
                port: http_directory::PORT,
            });
    let actions = boot_command::actions(&b.vm.boot_command, http)?;
    let typist = Typist {
        socket: engine::qemu::control_socket(&b.runtime_dir()),
        logs: b
            .serial_log()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        vm: b.vm.name.clone(),
        key_interval: b.vm.boot_key_interval,
        cancelled: stop,
        screenshot: shot,
    };
    typist.boot_wait(vm.started, b.vm.boot_wait)?;
    b.phase(VmPhase::BootCommand, None);
    typist.type_actions(&actions)?;
    b.note("boot command typed".into());
    Ok(())
}

/// Reads what the serial console adds, a few times a second, and looks in it for a boot
/// failure; a tail of what was read before is kept so a message split across two reads
/// is still seen.
struct ConsoleWatch {
    path: PathBuf,
    read: u64,
    text: String,
    next: std::time::Instant,
}

impl ConsoleWatch {
    const EVERY: Duration = Duration::from_millis(250);
    /// Enough for GRUB's error and its "Press any key" a few lines later.
    const KEEP: usize = 8192;

    fn new(path: PathBuf) -> Self {
        ConsoleWatch {
            path,
            read: 0,
            text: String::new(),
            next: std::time::Instant::now(),
        }
    }

    fn failure(&mut self) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        if std::time::Instant::now() < self.next {
            return None;
        }
        self.next = std::time::Instant::now() + Self::EVERY;
        let mut f = fs::File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(self.read)).ok()?;
        let mut new = Vec::new();
        // Bounded: a console flooding output is read in pieces, over several polls.
        let n = f.take(1 << 20).read_to_end(&mut new).ok()?;
        if n == 0 {
            return None;
        }
        self.read += n as u64;
        self.text.push_str(&String::from_utf8_lossy(&new));
        if self.text.len() > 2 * Self::KEEP {
            let mut cut = self.text.len() - Self::KEEP;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
        }
        boot_failure::detect(&self.text)
    }
}

/// Stops a VM that failed. Under `--on-error ask` a failed step was already asked about
/// while the VM ran (see [`super::ask`]); what is left is a failure to stop on.
pub(super) fn stop_failed(vm: &Launched) {
    vm.running.lock().unwrap_or_else(|p| p.into_inner()).kill();
}

/// The serial console's last lines, to follow a boot failure's message.
fn serial_tail(path: &Path) -> String {
    let t = fs::read(path).unwrap_or_default();
    let t = String::from_utf8_lossy(&t);
    let lines: Vec<&str> = t.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\nlast serial console lines:\n  {}",
        lines[lines.len().saturating_sub(10)..].join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BootMode, FirmwareBoot};
    use crate::job::Firmware;
    use crate::sources::BootFiles;

    #[test]
    fn only_auto_sends_a_firmware_vm_from_kvm_to_qemu() {
        let firmware = BootMode::Firmware(FirmwareBoot {
            firmware: Firmware::Bios,
            nvram: None,
        });
        let direct = BootMode::Direct(BootFiles {
            kernel: "/k".into(),
            initrd: None,
            root: "/dev/vda".into(),
            args: vec![],
        });
        assert!(falls_back_to_qemu(EngineChoice::Auto, "kvm", &firmware));
        assert!(!falls_back_to_qemu(EngineChoice::Auto, "kvm", &direct));
        assert!(!falls_back_to_qemu(EngineChoice::Auto, "qemu", &firmware));
        // Asked for by name: the engine's own refusal says why, rather than another engine.
        assert!(!falls_back_to_qemu(EngineChoice::Kvm, "kvm", &firmware));
    }
}
