//! `kiln build` from a [`BuildJob`] to a committed module, as a list of phases, with the
//! build's timeout, retries, `--on-error` and cancellation.
//!
//! The module: pick the engine, open the partial module and the runtime folder, fetch the
//! `files` URLs (`source`), start the network (`network`), build the VMs together (`vms`),
//! commit. Each VM, on its own thread: `source`, `boot`, network `handover`, `provision`,
//! `shutdown`, `capture`, one file each; a `VmBuild` (`vm`) carries its state from phase to
//! phase.
//!
//! Running VMs are kept in a shared [`VmRegistry`] so that a timeout, Ctrl-C or another VM's
//! failure can stop all of them at once; a VM thread blocked on its guest then sees the
//! connection drop and ends.

pub mod ask;
mod barrier;
mod boot;
pub mod boot_command;
mod boot_failure;
mod boot_path;
pub mod capture;
mod cleanup;
mod communicator;
mod error;
mod handover;
mod layers;
mod media;
mod network;
mod options;
mod provision;
mod registry;
pub mod shutdown;
mod source;
mod vm;
mod vms;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use crate::engine::BootMode;
use crate::events::{ms, BuildPhase, Event, VmPhase};
use crate::guest::Guest;
use crate::job::{BuildJob, Step};
use crate::module::{DiskRecord, IsoRecord, ModuleRecord, PendingModule, VmRecord};
use crate::sources::ResolvedSource;
use boot::Launched;
use cleanup::{KeepLogsOnFailure, RunDir};
use source::VmDisks;
use vm::{ModuleBuild, VmBuild};

pub use error::{
    BuildError, CaptureError, IsoPrefetchError, PrefetchError, ShutdownError, VmError, WriteError,
};
pub use options::{runtime_root, BuildContext, BuildOptions, OnError, StepCache};
pub use registry::{SharedVm, VmRegistry};
pub use source::inline_files;

/// Runs a build, with its retries. Returns the committed module's folder.
pub fn run(job: &BuildJob, opts: &BuildOptions, ctx: &BuildContext) -> Result<PathBuf, BuildError> {
    let mut attempt = 0;
    loop {
        match run_once(job, opts, ctx) {
            Ok(p) => return Ok(p),
            Err(e @ BuildError::Cancelled) => return Err(e),
            Err(e) if attempt < job.retries && !ctx.cancel.load(Ordering::SeqCst) => {
                attempt += 1;
                ctx.events.emit(&Event::Note {
                    vm: None,
                    message: format!("build failed ({e}); retry {attempt} of {}", job.retries),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// One attempt: the module's phases.
fn run_once(
    job: &BuildJob,
    opts: &BuildOptions,
    ctx: &BuildContext,
) -> Result<PathBuf, BuildError> {
    let start = Instant::now();
    let ev = ctx.events.as_ref();
    let build_phase = |phase, message: Option<String>| {
        ev.emit(&Event::Build {
            phase,
            elapsed_ms: ms(start.elapsed()),
            message,
        })
    };
    let failed = |e: &BuildError| build_phase(BuildPhase::Failed, Some(e.to_string()));
    build_phase(BuildPhase::Pending, Some(format!("module `{}`", job.name)));
    let engine = boot::pick_engine(opts.engine, job, ev, opts.cache.root())?;
    let pending = PendingModule::begin(&opts.output, &job.name, opts.replace)?;
    // Declared after `pending`, so it runs first when a failed attempt returns.
    let mut keep_logs = KeepLogsOnFailure {
        from: pending.dir().join("logs"),
        to: opts.failed_logs.clone(),
    };
    let run_dir = RunDir::create()?;
    // What `kiln console` needs to find this build's VMs by the module's name.
    crate::console::record(run_dir.path(), job)?;
    // Every `files[]` URL is fetched now, before anything boots, so a dead URL fails the build
    // at once with its reason instead of after a long boot.
    let job = &source::prefetch_files(job, &opts.cache, ev)
        .map_err(BuildError::from)
        .inspect_err(failed)?;
    let job = &source::prefetch_isos(job, &opts.cache, ev)
        .map_err(BuildError::from)
        .inspect_err(failed)?;

    build_phase(BuildPhase::Networking, None);
    let net = network::start(job, opts, ev).inspect_err(failed)?;
    pending.write_base(&job.base)?;
    network::serve_http_directory(job, opts, &net, run_dir.path(), ev).inspect_err(failed)?;

    build_phase(BuildPhase::Building, None);
    let module = ModuleBuild {
        job,
        opts,
        ctx,
        engine: engine.as_ref(),
        net: &net,
        pending: &pending,
        run_dir: run_dir.path(),
        start,
    };
    let vms = match vms::build_all(&module, &build_phase, build_vm) {
        Ok(vms) => vms,
        Err(e) if opts.on_error.keeps_work() && !matches!(e, BuildError::Cancelled) => {
            let kept = pending.keep();
            ev.emit(&Event::Note {
                vm: None,
                message: format!(
                    "--on-error abort: the VMs are stopped; their disks are kept in {} \
                     (the next `kiln build` into {} removes them)",
                    kept.join("work").display(),
                    opts.output.display()
                ),
            });
            return Err(e);
        }
        Err(e) => return Err(e),
    };

    let record = ModuleRecord {
        api_version: "kiln/v1".into(),
        kind: "Module".into(),
        name: job.name.clone(),
        kiln_version: crate::version::VERSION.into(),
        kiln_commit: crate::version::COMMIT.into(),
        engine: engine.name().into(),
        built_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: start.elapsed().as_secs_f64(),
        vms,
        manifest: job.manifest_text.clone(),
    };
    // The last moment an interrupt stops the build; after the rename the module is whole.
    if ctx.cancel.load(Ordering::SeqCst) {
        build_phase(BuildPhase::Failed, Some("cancelled".into()));
        return Err(BuildError::Cancelled);
    }
    keep_logs.to = None;
    let dir = pending.commit(&record)?;
    build_phase(
        BuildPhase::Succeeded,
        Some(format!("module at {}", dir.display())),
    );
    Ok(dir)
}

/// One VM, on its own thread: its phases, reported as its `Failed` phase when one fails.
fn build_vm(b: &VmBuild) -> Result<VmRecord, BuildError> {
    b.phase(VmPhase::Pending, None);
    match vm_phases(b) {
        Ok(record) => Ok(record),
        Err(VmError::Cancelled) => Err(BuildError::Cancelled),
        Err(e) => Err(b.fail(e)),
    }
}

fn vm_phases(b: &VmBuild) -> Result<VmRecord, VmError> {
    b.phase(VmPhase::SourceImporting, None);
    let resolved = source::resolve(b)?;
    if b.cancelled() {
        return Err(VmError::Cancelled);
    }
    let steps = provision::steps_as_run(b);
    let layers = layers::plan(b, &resolved.source, &steps);
    let layers = layers.as_ref();
    let disks = source::prepare_disks(b, &resolved, layers)?;
    let src = &resolved.source;
    let mut vm = boot::launch(b, &disks)?;
    let mut starts = 1;
    let mut result = guest_phases(b, &vm, src, &disks, &steps, layers);
    // An installer powers the VM off when it is done; the installed system is then booted
    // from its disk (first in the boot order; the CDs stay attached).
    while let Err(e) = &result {
        if !boot::restart_after_install(b, &vm, e, starts) {
            break;
        }
        b.note(
            "the VM powered off before its communicator answered (an installer that finished): \
             starting it again, from its disk"
                .into(),
        );
        drop(vm);
        vm = boot::relaunch(b, &disks)?;
        starts += 1;
        result = guest_phases(b, &vm, src, &disks, &steps, layers);
    }
    let (captured, agent_installed) = match result {
        Ok(done) => done,
        Err(e) if b.cancelled() && e.follows_cancel() => return Err(VmError::Cancelled),
        Err(e) => {
            boot::stop_failed(&vm);
            return Err(e);
        }
    };
    let firmware = capture::firmware(b, &disks)?;
    b.phase(VmPhase::DiskCaptured, None);
    let boot = match &disks.boot {
        BootMode::Direct(files) => Some(capture::boot_files(b, files)?),
        // Firmware boots the disk's own loader: there is no kernel of kiln's to keep.
        BootMode::Firmware(_) => None,
    };
    {
        let mut f = vm.log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "captured in {:.1}s", b.start.elapsed().as_secs_f64());
    }
    b.phase(VmPhase::Succeeded, None);
    Ok(VmRecord {
        name: b.vm.name.clone(),
        cpus: b.vm.cpus,
        memory_mib: b.vm.memory_mib,
        source: src.record.clone(),
        // The seed, or kiln over SSH, installed the agent into the captured disk.
        agent_in_image: src.agent_in_image || disks.seed.is_some() || agent_installed,
        boot,
        firmware: Some(firmware),
        disks: captured,
        invisible: b.vm.invisible,
        layers: layers.map(layers::VmLayers::record).unwrap_or_default(),
        isos: b
            .vm
            .isos
            .iter()
            .map(|i| IsoRecord {
                url: i.url.clone(),
                sha256: i.sha256.clone().unwrap_or_default(),
            })
            .collect(),
    })
}

/// The phases that talk to the running guest, from its agent's first answer to its disks
/// captured; with whether kiln installed its agent over SSH.
fn guest_phases(
    b: &VmBuild,
    vm: &Launched,
    src: &ResolvedSource,
    disks: &VmDisks,
    steps: &[Step],
    layers: Option<&layers::VmLayers>,
) -> Result<(Vec<DiskRecord>, bool), VmError> {
    let mut communicator = communicator::for_vm(b, vm)?;
    // A VM resumed from the step cache boots a disk its install already went through.
    let keys = layers.is_none_or(|l| l.resume.is_none());
    let guest = boot::wait_for_agent(b, vm, communicator.connector(), keys)
        .map_err(|e| communicator.explain_wait(e, b.vm.boot_timeout))?;
    let ssh = !communicator.takes_handover();
    let (mut guest, agent) = communicator.install_agent(b, vm, guest);
    let connector = communicator.connector();
    // A guest first reached over SSH runs its own DHCP client, agent or not.
    let links = if !ssh { handover::links(b) } else { Vec::new() };
    let network_ready =
        |g: &mut dyn Guest| handover::network_up(connector, g, &links, &b.vm.name, b.events());
    network_ready(&mut *guest);
    b.phase(VmPhase::Provisioning, None);
    let nvram = match &disks.boot {
        BootMode::Firmware(f) => f.nvram.clone(),
        BootMode::Direct(_) => None,
    };
    let checkpoints =
        layers.and_then(|l| layers::checkpointer(b, l, &vm.running, &disks.disks, nvram));
    let guest = provision::run(
        b,
        steps,
        guest,
        connector,
        &vm.log,
        &vm.socket,
        &network_ready,
        layers,
        checkpoints.as_ref(),
    )?;
    if b.cancelled() {
        return Err(VmError::Cancelled);
    }
    shutdown::wait_for_other_vms(b)?;
    shutdown::run(b, guest, connector, vm)?;
    Ok((capture::run(b, src, disks)?, ssh && agent))
}
