//! `kiln run`, `kiln exec`, `kiln shell`: boot a clone and reach its VMs through the agent.
//!
//! `kiln run <clone>` keeps the clone's VMs (and their device backends, which live in the
//! kiln process) running in the foreground until they power off or Ctrl-C. Their sockets are
//! under the per-user runtime folder (see [`crate::runtime`]) at `clones/<clone>/<vm>/`,
//! where `kiln exec` and `kiln shell` find them; they also reach a running build's VMs
//! ([`crate::running_vm`]). A run holds the clone's run lock ([`crate::run_lock`]) for its
//! whole life.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::build::runtime_root;
use crate::clone;
use crate::clone::{CloneError, CloneRecord, CloneVm};
use crate::engine::{self, DiskAttach, EngineChoice};
use crate::job::{BaseVm, NicJob};
use crate::launch::{self, LaunchError, VmStart};
use crate::leftovers::{self, Place};
use crate::module::{self, ModuleRecord};
use crate::network::{self as modnet, Internet};
use crate::running_vm;

use crate::{guest_shell, raw_terminal};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The clone to boot (a name in --clones).
    pub clone: String,
    #[arg(long, env = "KILN_CLONES", default_value = "clones")]
    pub clones: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineChoice,
    /// No VPC gets internet (NAT to the host), whatever the module says. The clone's VMs
    /// still reach each other by name.
    #[arg(long, env = "KILN_NO_INTERNET", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_internet: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// `<clone>/<vm>`; `<build>/<vm>` for a VM of a running or paused `kiln build` (`<build>`
    /// is the module's name or the build's process id, as `kiln console` takes it; a running
    /// clone of that name comes first); or a VM name only one running clone or build has.
    pub vm: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    /// Send this command's stdin to the command (until it ends); without it the command's
    /// stdin is empty.
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// How long to wait for the VM's agent to answer (it may still be booting).
    #[arg(long, default_value = "300")]
    pub wait_secs: u64,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// `<clone>/<vm>`; `<build>/<vm>` for a VM of a running or paused `kiln build` (`<build>`
    /// is the module's name or the build's process id, as `kiln console` takes it; a running
    /// clone of that name comes first); or a VM name only one running clone or build has.
    pub vm: String,
    #[arg(long, default_value = "300")]
    pub wait_secs: u64,
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let dir = a.clones.join(&a.clone);
    let c = clone::load(&dir)?;
    // First: a second run of a running clone is refused before it touches anything.
    let _run_lock = crate::run_lock::acquire(&dir, &c.name)?;
    let root = runtime_root()?;
    leftovers::sweep_and_report(&[
        (&a.clones, Place::Modules),
        (&root, Place::RuntimeRoot),
        (&root.join("clones"), Place::RuntimeClones),
    ]);
    // The disks under the overlays must be the ones the clone was made on.
    clone::verify_bases(&dir, &c)?;
    let module_path = clone::module_dir(&dir, &c);
    let rec =
        module::load(&module_path).with_context(|| format!("the module of clone `{}`", c.name))?;
    module::verify_layers(&module_path, &rec)?;
    let probe = kiln_vmm::doctor::probe();
    // The NICs a clone gets (and so their models) are the module's base values.
    let base = clone::load_base(&module_path)?;
    let pick = engine::pick(a.engine, &probe, needs_qemu(&rec, base.as_ref()).as_deref());
    eprintln!("engine: {}", pick.why);
    let eng = engine::make(pick.engine)?;
    let run_dir = root.join("clones").join(&c.name);
    // Holding the run lock, whatever an earlier run of this clone left here is ours to clear.
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("clearing {}", run_dir.display()));
        }
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    // Tells other kiln processes' clean-up that this folder is in use.
    let _dir_lock = leftovers::OwnerLock::hold(&run_dir)
        .with_context(|| format!("locking {}", run_dir.display()))?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    // A fresh isolated network for this clone, from the module's base values (no
    // buildOverrides): its own DHCP, DNS and NAT, shared with no other clone.
    let internet = if a.no_internet {
        Internet::Off
    } else {
        Internet::AsDeclared
    };
    let net = match &base {
        Some(b) => Some(modnet::start(&b.network, internet)?),
        None => {
            eprintln!(
                "{}: the module records no network ({} is missing): its VMs get no NIC",
                c.name,
                clone::BASE_FILE_NAME
            );
            None
        }
    };
    let clone_run = CloneRun {
        dir: &dir,
        clone: &c,
        module_dir: &module_path,
        module: &rec,
        run_dir: &run_dir,
    };
    let mut vms = Vec::new();
    for (i, v) in c.vms.iter().enumerate() {
        let bv = base.as_ref().and_then(|b| b.vm(&v.name));
        let (net, nics, static_links) = match (&net, &base, bv) {
            (Some(net), Some(b), Some(bv)) => (
                Some(net),
                bv.nics.as_slice(),
                modnet::static_links(&b.network, net, &bv.nics),
            ),
            _ => (None, &[][..], Vec::new()),
        };
        let spec = clone_run.vm_start(i, v, bv, nics)?;
        eprintln!("{}/{}: boots {}", c.name, v.name, boot_label(&spec.boot));
        std::fs::create_dir_all(&spec.workdir)?;
        let serial_log = spec.serial_log.clone();
        // 0600 before the engine appends to it: the console may show secrets.
        crate::log_file::append(&serial_log)
            .with_context(|| format!("opening {}", serial_log.display()))?;
        let vm = match launch::start(eng.as_ref(), net, spec) {
            Ok(vm) => vm,
            Err(LaunchError::Nics(e)) => return Err(e.into()),
            Err(e @ LaunchError::Engine(_)) => {
                return Err(anyhow::Error::new(e).context(format!("starting VM `{}`", v.name)))
            }
        };
        eprintln!(
            "{}/{}: running (kiln exec {}/{} -- CMD; serial log {})",
            c.name,
            v.name,
            c.name,
            v.name,
            serial_log.display()
        );
        if !static_links.is_empty() {
            // In the background: the agent answers once the guest has booted.
            let socket = vm.vsock_socket().to_path_buf();
            let cancel = cancel.clone();
            let label = format!("{}/{}", c.name, v.name);
            std::thread::spawn(move || hand_over_static(&socket, &static_links, &cancel, &label));
        }
        vms.push((v.name.clone(), vm));
    }
    // Until every VM has powered off, or Ctrl-C.
    while !cancel.load(Ordering::SeqCst) {
        let mut all_done = true;
        for (_, vm) in vms.iter_mut() {
            if vm.is_running() {
                all_done = false;
            }
        }
        if all_done {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, mut vm) in vms {
        vm.kill();
        eprintln!("{}/{name}: stopped", c.name);
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(ExitCode::SUCCESS)
}

/// Why the kvm engine cannot run the module's VMs (a disk bus it lacks, a firmware boot), if
/// so: `--engine auto` then picks qemu.
fn needs_qemu(rec: &ModuleRecord, base: Option<&crate::job::BaseView>) -> Option<String> {
    rec.vms.iter().find_map(|v| {
        let nics = base.and_then(|b| b.vm(&v.name)).map(|b| &b.nics);
        engine::kvm_cannot_run(
            &v.name,
            v.disks.iter().map(|d| (&*d.name, d.bus)),
            nics.into_iter().flatten().map(|n| (&*n.name, n.model)),
        )
        .or_else(|| {
            let fw = v.firmware.as_ref().filter(|f| f.booted)?;
            Some(format!(
                "VM `{}` boots through {} firmware, and the kvm engine (kiln-vmm) boots only a \
                 kernel directly",
                v.name,
                fw.firmware.as_str()
            ))
        })
    })
}

/// How a clone's VM boots, for the run's output.
fn boot_label(b: &engine::BootMode) -> String {
    match b {
        engine::BootMode::Direct(_) => "its kernel directly".into(),
        engine::BootMode::Firmware(f) => match &f.nvram {
            Some(n) => format!(
                "through {} firmware (its own NVRAM {})",
                f.firmware.as_str(),
                n.display()
            ),
            None => format!("through {} firmware", f.firmware.as_str()),
        },
    }
}

/// One run of a clone: where its files are and its module's record.
struct CloneRun<'a> {
    dir: &'a Path,
    clone: &'a CloneRecord,
    module_dir: &'a Path,
    module: &'a ModuleRecord,
    run_dir: &'a Path,
}

impl CloneRun<'_> {
    /// What `kiln run` asks the engine to start for the clone's `index`th VM `v`: its
    /// overlays, the base resources (buildOverrides were for the build only) and the boot its
    /// module's build used.
    fn vm_start<'v>(
        &self,
        index: usize,
        v: &'v CloneVm,
        bv: Option<&BaseVm>,
        nics: &'v [NicJob],
    ) -> Result<VmStart<'v>, CloneError> {
        let mv = module::pick_vm(self.module, Some(&v.name))?;
        let boot = crate::clone::boot_mode(self.dir, self.clone, v, self.module_dir, mv)?;
        Ok(VmStart {
            name: &v.name,
            cpus: bv.map_or(mv.cpus, |b| b.cpus),
            memory_mib: bv.map_or(mv.memory_mib, |b| b.memory_mib),
            boot,
            disks: v
                .disks
                .iter()
                .zip(&mv.disks)
                .map(|(rel, d)| DiskAttach {
                    name: d.name.clone(),
                    path: self.dir.join(rel),
                    read_only: false,
                    bus: d.bus,
                })
                .collect(),
            nics,
            workdir: self.run_dir.join(&v.name),
            serial_log: self.dir.join(format!("{}-serial.log", v.name)),
            index,
            peripherals: Default::default(),
        })
    }
}

/// Gives a clone's VM its static addresses (NICs with an `ip` on subnets without DHCP)
/// through its agent, as builds do: nothing else configures them, and a boot of the clone
/// starts without them (they live under `/run`, not in the image).
fn hand_over_static(
    socket: &Path,
    links: &[kiln_agent::LinkConfig],
    cancel: &AtomicBool,
    label: &str,
) {
    use crate::guest::{Connector, VsockConnector};
    let addrs: Vec<String> = links
        .iter()
        .map(|l| format!("{}/{}", l.address, l.prefix))
        .collect();
    let connector = VsockConnector::new(socket, crate::sources::bootstrap::AGENT_VSOCK_PORT);
    let r = connector
        .connect_until(crate::provision::BOOT_TIMEOUT, cancel, &mut |_| Ok(()))
        .map_err(crate::guest::GuestError::from)
        .and_then(|mut g| launch::hand_over(&connector, &mut *g, links));
    match r {
        Ok(()) => eprintln!("{label}: static address {} configured", addrs.join(", ")),
        Err(_) if cancel.load(Ordering::SeqCst) => {}
        Err(e) => eprintln!(
            "{label}: warning: the static address {} could not be configured in the guest: {e}",
            addrs.join(", ")
        ),
    }
}

fn exit_code(st: &kiln_agent::ExitStatus) -> ExitCode {
    match (st.code, st.signal) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(s)) => ExitCode::from(u8::try_from(128 + s).unwrap_or(1)),
        _ => ExitCode::FAILURE,
    }
}

pub fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    let sock = running_vm::find(&a.vm)?;
    let mut c = running_vm::connect(&sock, Duration::from_secs(a.wait_secs))?;
    let req = kiln_agent::ExecRequest::argv(a.command.clone());
    let mut stdin = std::io::stdin();
    let input: Option<&mut (dyn std::io::Read + Send)> =
        if a.stdin { Some(&mut stdin) } else { None };
    let st = c.exec(&req, input, |s, d| match s {
        kiln_agent::OutputStream::Stdout => {
            let mut o = std::io::stdout();
            let _ = o.write_all(d);
            let _ = o.flush();
        }
        kiln_agent::OutputStream::Stderr => {
            let _ = std::io::stderr().write_all(d);
        }
    })?;
    Ok(exit_code(&st))
}

pub fn shell(a: ShellArgs) -> anyhow::Result<ExitCode> {
    let sock = running_vm::find(&a.vm)?;
    let mut c = running_vm::connect(&sock, Duration::from_secs(a.wait_secs))?;
    if raw_terminal::is_terminal(0) && raw_terminal::is_terminal(1) {
        match guest_shell::on_terminal(&mut c, &a.vm) {
            Err(kiln_agent::ClientError::Unsupported { reason, .. }) => {
                eprintln!("kiln shell: no terminal in this guest: {reason}");
            }
            other => return Ok(exit_code(&other?)),
        }
    }
    eprintln!(
        "kiln shell: connected to {} (no terminal: line mode; exit or Ctrl-D ends it)",
        a.vm
    );
    let req = kiln_agent::ExecRequest::argv(["/bin/bash", "-i"]).merge_stderr(true);
    let mut stdin = std::io::stdin();
    let input: &mut (dyn std::io::Read + Send) = &mut stdin;
    let st = c.exec(&req, Some(input), |_, d| {
        let mut o = std::io::stdout();
        let _ = o.write_all(d);
        let _ = o.flush();
    })?;
    Ok(exit_code(&st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::tests::{build_with, clone_of, uefi};
    use crate::engine::BootMode;

    #[test]
    fn a_uefi_clone_starts_through_the_firmware_on_its_own_nvram() {
        let d = tempfile::tempdir().unwrap();
        let (modules, clones) = (d.path().join("modules"), d.path().join("clones"));
        build_with(&modules, "m", b"v1", None, Some(uefi(b"vars")));
        let dir = clone_of(&modules, &clones, "m", "m");
        let c = clone::load(&dir).unwrap();
        let module_dir = clone::module_dir(&dir, &c);
        let rec = module::load(&module_dir).unwrap();
        assert_eq!(
            needs_qemu(&rec, None).as_deref(),
            Some(
                "VM `web` boots through uefi firmware, and the kvm engine (kiln-vmm) boots \
                 only a kernel directly"
            )
        );
        let run = CloneRun {
            dir: &dir,
            clone: &c,
            module_dir: &module_dir,
            module: &rec,
            run_dir: &d.path().join("run"),
        };
        let spec = run.vm_start(0, &c.vms[0], None, &[]).unwrap();
        let BootMode::Firmware(fw) = &spec.boot else {
            panic!("{:?}", spec.boot)
        };
        assert_eq!(fw.firmware, crate::job::Firmware::Uefi);
        assert_eq!(fw.nvram.as_deref(), Some(&*dir.join("nvram/web.fd")));
        assert_eq!(spec.disks[0].path, dir.join("disks/web-root.qcow2"));
        assert!(boot_label(&spec.boot).starts_with("through uefi firmware (its own NVRAM"));
    }
}
