//! Engines: what runs a VM's CPU. Both engines get the same [`VmLaunch`] and serve the same
//! kiln device backends (block, vsock, net); they differ only in who executes the guest:
//! - `kvm`: kiln's own VMM on /dev/kvm, one process per VM.
//! - `qemu`: `qemu-system-x86_64 -accel tcg` with kiln's backends over vhost-user.
//!
//! [`pick`] implements `--engine auto`.

pub mod firmware;
pub mod kvm;
pub mod kvm_smoke;
pub mod qemu;
mod supervised;

use crate::path_io::PathIoError;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use crate::sources::BootFiles;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("`{program}` is not installed ({hint})")]
    Missing { program: String, hint: String },
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Backend(String),
    #[error("the {0} engine is not implemented yet")]
    NotImplemented(&'static str),
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareError),
}

/// Most guest resets one VM may do before its engine stops starting it again (both engines
/// start a fresh VM process per boot), so a guest that panics and reboots in a loop
/// (`panic=-1`) ends instead of spinning until the boot timeout.
pub const MAX_RESETS: u32 = 32;

/// Where the host side of a VM's vsock device listens (`CONNECT <port>`), under either engine.
pub fn vsock_uds(workdir: &Path) -> PathBuf {
    workdir.join("vsock.sock")
}

/// One disk given to a VM.
#[derive(Debug, Clone)]
pub struct DiskAttach {
    pub name: String,
    /// A qcow2 overlay (or a raw seed image).
    pub path: PathBuf,
    pub read_only: bool,
    /// How the guest sees it; only the qemu engine offers more than virtio.
    pub bus: crate::job::DiskBus,
}

/// One NIC given to a VM: its port on the module network ([`crate::network::attach`]).
#[derive(Clone)]
pub struct NicAttach {
    pub name: String,
    pub mac: [u8; 6],
    pub port: Arc<dyn kiln_net::FramePort>,
    /// The device the guest sees; only the qemu engine offers more than virtio.
    pub model: crate::job::NicModel,
}

impl NicAttach {
    /// `xx:xx:xx:xx:xx:xx`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl std::fmt::Debug for NicAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NicAttach")
            .field("name", &self.name)
            .field("mac", &self.mac_string())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// How an engine boots a VM.
#[derive(Debug, Clone)]
pub enum BootMode {
    /// kiln loads the kernel and initrd itself, with its own command line: the fast path.
    Direct(BootFiles),
    /// The firmware runs the first disk's boot loader.
    Firmware(FirmwareBoot),
}

/// A boot through firmware.
#[derive(Debug, Clone)]
pub struct FirmwareBoot {
    pub firmware: crate::job::Firmware,
    /// UEFI: the VM's own NVRAM (a copy of the firmware's variable store), written by the
    /// guest and kept across its reboots. None for BIOS.
    pub nvram: Option<PathBuf>,
}

/// Everything an engine needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub boot: BootMode,
    /// Added to kiln's kernel command line (direct boot).
    pub cmdline_extra: Vec<String>,
    /// The first is the boot disk.
    pub disks: Vec<DiskAttach>,
    /// Sockets, pid files and the serial log go here.
    pub workdir: PathBuf,
    /// The guest's serial console is appended to this file.
    pub serial_log: PathBuf,
    /// The guest's vsock context id.
    pub cid: u32,
    /// The VM's NICs on the module network, in slot order.
    pub nics: Vec<NicAttach>,
    /// CD-ROMs, a floppy, a screen: what an ISO install adds (qemu engine only).
    pub peripherals: Peripherals,
}

/// What an ISO install adds to a build VM; only the qemu engine offers these.
#[derive(Debug, Clone, Default)]
pub struct Peripherals {
    /// ISO images, attached read-only as CD-ROMs after the disks, in order. The boot order is
    /// the first disk, then the first CD: a blank disk boots the installer, and the installed
    /// disk boots itself once the installer wrote a boot loader (no media swap).
    pub cdroms: Vec<PathBuf>,
    /// A 1.44 MB floppy image, drive A.
    pub floppy: Option<PathBuf>,
    /// A screen (standard VGA) and keyboard, driven through the control socket
    /// ([`qemu::control_socket`]): typed into by a boot command, captured by screenshots.
    pub screen: bool,
    /// With `screen`: a VNC server on a Unix socket in the work folder with a one-time
    /// password ([`qemu::vnc`]), which `kiln console` and `kiln serve` show. Off for
    /// `invisible` VMs, which keep their screen for boot commands and screenshots.
    pub console: bool,
}

impl Peripherals {
    pub fn is_empty(&self) -> bool {
        self.cdroms.is_empty() && self.floppy.is_none() && !self.screen
    }
}

impl VmLaunch {
    /// Creates the VM's work folder (sockets, pid files, logs).
    pub fn create_workdir(&self) -> Result<(), EngineError> {
        std::fs::create_dir_all(&self.workdir)
            .map_err(PathIoError::at("creating", &self.workdir))?;
        Ok(())
    }

    /// The kernel command line for a direct boot of `boot`: the image's own arguments kiln
    /// keeps, then kiln's (root device, serial console, the VM's hostname), which win
    /// ([`crate::bootimage::kargs::merge`]).
    pub fn cmdline(&self, boot: &BootFiles) -> String {
        let mut own = vec![
            format!("root={}", boot.root),
            "rw".to_string(),
            "console=ttyS0".to_string(),
            format!("systemd.hostname={}", self.name),
            // Debian's cloud kernel reboots on panic only when told; a build should fail fast.
            "panic=-1".to_string(),
        ];
        own.extend(self.cmdline_extra.iter().cloned());
        let kargs = crate::bootimage::kargs::merge(&boot.args, &own);
        crate::bootimage::kargs::render(&kargs)
    }
}

/// A running VM.
pub trait RunningVm: Send {
    /// The Unix socket of the VM's vsock device (host side, `CONNECT <port>` handshake).
    fn vsock_socket(&self) -> &Path;
    /// Waits up to `timeout` for the VM to end by itself; `None` if it is still running.
    fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>>;
    /// Whether the VM process is still there.
    fn is_running(&mut self) -> bool;
    /// Stops the VM at once (no guest shutdown) and its backends.
    fn kill(&mut self);
    /// OS process ids this VM owns (for reports and tests).
    fn pids(&self) -> Vec<u32>;
    /// The VM's writable disks as this process serves them; empty where the disks are
    /// served elsewhere (the kvm engine's VMM process, QEMU's own block layer).
    fn live_disks(&self) -> Vec<std::sync::Arc<kiln_disk::LiveDisk>> {
        Vec::new()
    }
    /// The VM's writable disks as the step cache's live checkpoints swap them: the
    /// [`live_disks`](Self::live_disks), or disks served by a process that takes checkpoint
    /// requests (the kvm engine's VMM); empty where none can be swapped (QEMU's own block
    /// layer).
    fn checkpoint_disks(&self) -> Vec<std::sync::Arc<dyn crate::step_cache::CheckpointDisk>> {
        self.live_disks()
            .into_iter()
            .map(|d| d as std::sync::Arc<dyn crate::step_cache::CheckpointDisk>)
            .collect()
    }
}

/// An engine.
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    fn launch(&self, vm: &VmLaunch) -> Result<Box<dyn RunningVm>, EngineError>;
}

/// Why the kvm engine cannot run a VM with these disks and NICs, if it cannot: kiln-vmm has
/// only virtio-blk and virtio-net, and giving a device another bus or model than the one asked
/// for would change what the guest sees.
pub fn kvm_cannot_run<'a>(
    vm: &str,
    disks: impl IntoIterator<Item = (&'a str, crate::job::DiskBus)>,
    nics: impl IntoIterator<Item = (&'a str, crate::job::NicModel)>,
) -> Option<String> {
    if let Some((disk, bus)) = disks
        .into_iter()
        .find(|(_, bus)| *bus != crate::job::DiskBus::Virtio)
    {
        return Some(format!(
            "VM `{vm}`: disk `{disk}` is on bus `{}`, and the kvm engine (kiln-vmm) has only \
             virtio-blk disks",
            bus.as_str()
        ));
    }
    let (nic, model) = nics
        .into_iter()
        .find(|(_, model)| *model != crate::job::NicModel::Virtio)?;
    Some(format!(
        "VM `{vm}`: NIC `{nic}` is model `{}`, and the kvm engine (kiln-vmm) has only \
         virtio-net NICs",
        model.as_str()
    ))
}

/// Which engine a build uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    Auto,
    Kvm,
    Qemu,
}

/// What `--engine auto` found.
#[derive(Debug, Clone)]
pub struct Pick {
    pub engine: EngineChoice,
    pub why: String,
}

/// `--engine auto`: kvm where `kiln doctor`'s probe says /dev/kvm runs a stock kernel AND
/// the kvm smoke test passed on this host ([`kvm_smoke`]; run here once when missing and
/// cheap), else qemu with TCG, with a one-line reason; qemu whatever both say when
/// `needs_qemu` gives a reason ([`kvm_cannot_run`]).
pub fn pick(
    choice: EngineChoice,
    probe: &kiln_vmm::doctor::Probe,
    needs_qemu: Option<&str>,
) -> Pick {
    let probe_says_kvm = probe.recommended_engine == kiln_vmm::doctor::Engine::Kvm;
    let smoke = match choice {
        EngineChoice::Qemu => kvm_smoke::SmokeStatus::NotRun(String::new()),
        _ => kvm_smoke::status_for_auto(
            choice == EngineChoice::Auto && probe_says_kvm && needs_qemu.is_none(),
        ),
    };
    let mut pick = pick_with(choice, probe, needs_qemu, &smoke);
    if pick.engine == EngineChoice::Qemu
        && choice == EngineChoice::Auto
        && qemu::find_qemu().is_none()
    {
        pick.why
            .push_str(" (but qemu-system-x86_64 is not installed)");
    }
    pick
}

/// [`pick`]'s decision, given the smoke-test status (pure, for tests).
pub fn pick_with(
    choice: EngineChoice,
    probe: &kiln_vmm::doctor::Probe,
    needs_qemu: Option<&str>,
    smoke: &kvm_smoke::SmokeStatus,
) -> Pick {
    use kvm_smoke::SmokeStatus;
    let failed = match smoke {
        SmokeStatus::Done(r) if !r.passed => Some(format!(
            "kvm failed the smoke test on {}: {}",
            r.when, r.reason
        )),
        _ => None,
    };
    match choice {
        EngineChoice::Kvm => Pick {
            engine: EngineChoice::Kvm,
            // Forcing kvm where the probe says a stock kernel cannot run is allowed (tiny
            // guests, PVM guest kernels), but the build should say why it may never boot.
            why: match (probe.stock_kernel_ok, failed) {
                (true, None) => "asked for with --engine kvm".into(),
                (true, Some(f)) => format!(
                    "asked for with --engine kvm; warning: {f} (the build may fail at its boot \
                     timeout)"
                ),
                (false, _) => format!(
                    "asked for with --engine kvm; warning: {} (a stock kernel will likely not \
                     boot, and the build then fails at its boot timeout)",
                    probe.reason
                ),
            },
        },
        EngineChoice::Qemu => Pick {
            engine: EngineChoice::Qemu,
            why: "asked for with --engine qemu".into(),
        },
        EngineChoice::Auto => {
            let (engine, why) = match (needs_qemu, probe.recommended_engine, smoke) {
                (Some(r), _, _) => (EngineChoice::Qemu, format!("{r}; qemu serves it")),
                (None, kiln_vmm::doctor::Engine::Qemu, _) => (
                    EngineChoice::Qemu,
                    match failed {
                        // A forced smoke test (`kiln doctor --smoke`) confirms the probe.
                        Some(f) => format!("{}; {f}", probe.reason),
                        None => probe.reason.clone(),
                    },
                ),
                (None, kiln_vmm::doctor::Engine::Kvm, SmokeStatus::Done(r)) if r.passed => (
                    EngineChoice::Kvm,
                    format!(
                        "{}, and it passed the smoke test on {}",
                        probe.reason, r.when
                    ),
                ),
                (None, kiln_vmm::doctor::Engine::Kvm, SmokeStatus::Done(_)) => (
                    EngineChoice::Qemu,
                    format!(
                        "{}: QEMU with TCG supplies the CPU",
                        failed.unwrap_or_default()
                    ),
                ),
                (None, kiln_vmm::doctor::Engine::Kvm, SmokeStatus::NotRun(why)) => (
                    EngineChoice::Qemu,
                    format!("kvm: smoke test {why}: QEMU with TCG supplies the CPU"),
                ),
            };
            Pick { engine, why }
        }
    }
}

/// The engine object for a choice (after `pick`).
pub fn make(choice: EngineChoice) -> Result<Box<dyn Engine>, EngineError> {
    make_with_layers(choice, None)
}

/// [`make`], for a build whose step cache keeps its layers under `layers` (the kvm engine's
/// VMM then takes checkpoints, of layers there only).
pub fn make_with_layers(
    choice: EngineChoice,
    layers: Option<&Path>,
) -> Result<Box<dyn Engine>, EngineError> {
    match choice {
        EngineChoice::Qemu | EngineChoice::Auto => Ok(Box::new(qemu::QemuEngine::new()?)),
        EngineChoice::Kvm => Ok(Box::new(
            kvm::KvmEngine::new()?.with_layer_root(layers.map(Path::to_path_buf)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::doctor::{probe_with, HostFacts};

    use kvm_smoke::{SmokeRecord, SmokeStatus};

    fn no_kvm_probe() -> kiln_vmm::doctor::Probe {
        probe_with(&HostFacts::default(), Path::new("/nonexistent/kvm"))
    }

    /// A probe that says kvm runs stock kernels here.
    fn kvm_probe() -> kiln_vmm::doctor::Probe {
        let mut p = no_kvm_probe();
        p.recommended_engine = kiln_vmm::doctor::Engine::Kvm;
        p.stock_kernel_ok = true;
        p.reason = "/dev/kvm on Intel VT-x".into();
        p
    }

    fn smoke(passed: bool) -> SmokeStatus {
        SmokeStatus::Done(SmokeRecord {
            host_kernel: "6.1".into(),
            kiln_version: "0.1.0".into(),
            kernel: "/k".into(),
            kernel_sha256: "ab".into(),
            passed,
            reason: if passed {
                "userspace reached in 0.40 s"
            } else {
                "no sign of userspace within 20 s"
            }
            .into(),
            when: "2026-12-07T12:00:00.000Z".into(),
            seconds: 0.4,
            console_tail: String::new(),
        })
    }

    #[test]
    fn auto_follows_the_doctor_probe() {
        // No /dev/kvm at this path: the probe recommends qemu, and auto follows it.
        let p = no_kvm_probe();
        let not_run = SmokeStatus::NotRun("not run yet (run `kiln doctor`)".into());
        let pick = pick_with(EngineChoice::Auto, &p, None, &not_run);
        assert_eq!(pick.engine, EngineChoice::Qemu);
        assert_eq!(pick.why, p.reason);
        let forced = pick_with(EngineChoice::Kvm, &p, None, &not_run);
        assert_eq!(forced.engine, EngineChoice::Kvm);
        // Forced where the probe says stock kernels cannot run: the reason says so.
        assert!(!p.stock_kernel_ok);
        assert!(
            forced.why.contains("warning") && forced.why.contains(&p.reason),
            "{}",
            forced.why
        );
    }

    #[test]
    fn auto_picks_kvm_only_when_the_probe_and_the_smoke_test_agree() {
        let yes = kvm_probe();
        let no = no_kvm_probe();
        let not_run = SmokeStatus::NotRun("not run yet (run `kiln doctor`)".into());
        // (probe, smoke) -> engine, and a word the reason must hold.
        let table = [
            (
                &yes,
                smoke(true),
                EngineChoice::Kvm,
                "passed the smoke test on 2026-12-07",
            ),
            (
                &yes,
                smoke(false),
                EngineChoice::Qemu,
                "kvm failed the smoke test on 2026-12-07T12:00:00.000Z: no sign of userspace",
            ),
            (
                &yes,
                not_run.clone(),
                EngineChoice::Qemu,
                "kvm: smoke test not run yet (run `kiln doctor`)",
            ),
            (&no, smoke(true), EngineChoice::Qemu, "/dev/kvm is absent"),
            (
                &no,
                smoke(false),
                EngineChoice::Qemu,
                "kvm failed the smoke test",
            ),
            (&no, not_run, EngineChoice::Qemu, "/dev/kvm is absent"),
        ];
        for (probe, status, engine, says) in table {
            let p = pick_with(EngineChoice::Auto, probe, None, &status);
            assert_eq!(p.engine, engine, "{status:?}: {}", p.why);
            assert!(p.why.contains(says), "{status:?}: {}", p.why);
            // Asked for explicitly, the choice is kept whatever the smoke test said.
            assert_eq!(
                pick_with(EngineChoice::Qemu, probe, None, &status).engine,
                EngineChoice::Qemu
            );
            assert_eq!(
                pick_with(EngineChoice::Kvm, probe, None, &status).engine,
                EngineChoice::Kvm
            );
        }
        // A failed smoke test makes a forced kvm warn.
        let forced = pick_with(EngineChoice::Kvm, &yes, None, &smoke(false));
        assert!(
            forced.why.contains("warning: kvm failed the smoke test"),
            "{}",
            forced.why
        );
    }

    #[test]
    fn auto_picks_qemu_for_a_disk_kiln_vmm_cannot_serve() {
        use crate::job::DiskBus;
        // A probe and smoke test that say kvm, so only the disk can send auto to qemu.
        let p = kvm_probe();
        assert_eq!(kvm_cannot_run("a", [("root", DiskBus::Virtio)], []), None);
        let why = kvm_cannot_run(
            "a",
            [("root", DiskBus::Virtio), ("data", DiskBus::Sata)],
            [],
        )
        .expect("sata needs qemu");
        assert_eq!(
            why,
            "VM `a`: disk `data` is on bus `sata`, and the kvm engine (kiln-vmm) has only \
             virtio-blk disks"
        );
        let auto = pick_with(EngineChoice::Auto, &p, Some(&why), &smoke(true));
        assert_eq!(auto.engine, EngineChoice::Qemu);
        assert!(auto.why.starts_with(&why), "{}", auto.why);
        assert_eq!(
            pick_with(EngineChoice::Auto, &p, None, &smoke(true)).engine,
            EngineChoice::Kvm
        );
    }

    #[test]
    fn auto_picks_qemu_for_a_nic_kiln_vmm_cannot_serve() {
        use crate::job::{DiskBus, NicModel};
        // A probe and smoke test that say kvm, so only the NIC can send auto to qemu.
        let p = kvm_probe();
        let disks = [("root", DiskBus::Virtio)];
        assert_eq!(
            kvm_cannot_run("a", disks, [("eth0", NicModel::Virtio)]),
            None
        );
        for (model, name) in [(NicModel::E1000, "e1000"), (NicModel::E1000e, "e1000e")] {
            let why = kvm_cannot_run("a", disks, [("eth0", NicModel::Virtio), ("lan", model)])
                .expect("an emulated NIC needs qemu");
            assert_eq!(
                why,
                format!(
                    "VM `a`: NIC `lan` is model `{name}`, and the kvm engine (kiln-vmm) has \
                     only virtio-net NICs"
                )
            );
            let auto = pick_with(EngineChoice::Auto, &p, Some(&why), &smoke(true));
            assert_eq!(auto.engine, EngineChoice::Qemu);
            assert!(auto.why.starts_with(&why), "{}", auto.why);
        }
    }
}
