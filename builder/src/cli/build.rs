//! `kiln build` and `kiln resume`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::build::{self, BuildContext, BuildOptions, OnError, VmRegistry};
use crate::cache::Cache;
use crate::engine::EngineChoice;
use crate::events::{EventSink, FileSink, HumanSink, JsonSink, Tee};
use crate::job::BootChoice;
use crate::plan_adapter::{load_job, LoadJobError};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The module manifest.
    pub file: PathBuf,
    /// Folder the module is written to (`<output>/<name>/`); buildRef parents are read here.
    #[arg(long, short = 'o', env = "KILN_MODULES", default_value = "modules")]
    pub output: PathBuf,
    /// Which engine runs the VMs: auto picks kvm with hardware virtualization, else qemu.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineChoice,
    /// On a failure, as Packer's -on-error: cleanup (stop every VM, remove the partial
    /// module), abort (stop every VM, keep the partial module's folder with the VMs' disks,
    /// where the build says) or ask (at a failed step keep the VM up and ask on the terminal:
    /// retry the step, open a shell in the VM, continue, or abort; stdin must be a terminal).
    /// The logs are kept in every case.
    #[arg(long, value_enum, default_value = "cleanup")]
    pub on_error: OnError,
    /// Capture each buildRef VM's boot disk as a qcow2 layer over its parent module's disk
    /// (relative backing path, parent digest in module.yaml) instead of a standalone image.
    #[arg(long)]
    pub thin: bool,
    /// Machine-readable events on stdout, one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// No VPC gets internet (NAT to the host), whatever the manifest says: a hermetic build.
    /// The VMs still reach each other by name.
    #[arg(long, env = "KILN_NO_INTERNET", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_internet: bool,
    /// Replace a module of the same name. Without it such a build is refused before it
    /// starts. Clones of the old module keep working: they hold links to its disks.
    #[arg(long)]
    pub force: bool,
    /// How every VM boots: direct (kiln loads the image's kernel) or firmware (the image's
    /// own boot loader); auto chooses per VM, as each VM's `boot` field does.
    #[arg(long, value_enum, default_value = "auto")]
    pub boot: BootChoice,
    /// Run every step: start no VM from the step cache's layers (the layers this build takes
    /// still go into the cache for the next one).
    #[arg(long)]
    pub no_cache: bool,
}

pub fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let json = a.json;
    let result = build_inner(a);
    if let (true, Err(e)) = (json, &result) {
        // Under `--json` a failure is also the last line on stdout, so a tool reading only
        // stdout learns why (stderr still gets the human text).
        let diagnostics = e
            .chain()
            .find_map(|c| c.downcast_ref::<LoadJobError>()?.diagnostics())
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        JsonSink::new().emit(&crate::events::Event::Error {
            message: super::report::render(e),
            diagnostics,
        });
    }
    result
}

fn build_inner(a: BuildArgs) -> anyhow::Result<ExitCode> {
    if a.on_error == OnError::Ask {
        build::ask::check_terminal()?;
    }
    let mut job = load_job(&a.file, &mut |w| eprintln!("{}", w.render()))?;
    if a.boot != BootChoice::Auto {
        for vm in &mut job.vms {
            vm.boot = a.boot;
        }
    }
    // Before any work: the build checks again when it starts and at commit.
    crate::module::check_replace(&a.output, &job.name, a.force)?;
    let cache = Cache::from_env()?;
    let display: Arc<dyn EventSink> = if a.json {
        Arc::new(JsonSink::new())
    } else {
        Arc::new(HumanSink::new())
    };
    // Events also go to a log beside the output, copied into the module's logs at the end.
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    // What killed builds left here and in the runtime folder.
    let run_root = build::runtime_root()?;
    crate::leftovers::sweep_and_report(&[
        (&a.output, crate::leftovers::Place::Modules),
        (&run_root, crate::leftovers::Place::RuntimeRoot),
    ]);
    let failed_logs = crate::build_logs::failed_dir(&a.output, &job.name);
    let events_path = a
        .output
        .join(format!(".{}.events-{}.jsonl", job.name, std::process::id()));
    let file_sink: Arc<dyn EventSink> = Arc::new(FileSink::create(&events_path)?);
    let events: Arc<dyn EventSink> = Arc::new(Tee(vec![display, file_sink]));

    let cancel = Arc::new(AtomicBool::new(false));
    let registry = VmRegistry::default();
    // Set by the user's Ctrl-C only (a timeout or another VM's failure also sets `cancel`).
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let registry = registry.clone();
        let interrupted = interrupted.clone();
        ctrlc::set_handler(move || {
            if interrupted.swap(true, Ordering::SeqCst) {
                // What is left behind is removed by the next run's start-up clean-up.
                eprintln!("kiln: interrupted again; stopping now");
                registry.kill_all();
                std::process::exit(130);
            }
            eprintln!("kiln: interrupted; stopping every VM (Ctrl-C again to stop at once)");
            cancel.store(true, Ordering::SeqCst);
            registry.kill_all();
        })
        .context("installing the Ctrl-C handler")?;
    }
    let ctx = BuildContext {
        events,
        cancel: cancel.clone(),
        registry,
    };
    let opts = BuildOptions {
        output: a.output.clone(),
        engine: a.engine,
        on_error: a.on_error,
        thin: a.thin,
        cache,
        internet: if a.no_internet {
            crate::network::Internet::Off
        } else {
            crate::network::Internet::AsDeclared
        },
        failed_logs: Some(failed_logs.clone()),
        replace: a.force,
        step_cache: build::StepCache {
            reuse: !a.no_cache,
            layers: true,
        },
    };
    let result = build::run(&job, &opts, &ctx);
    match result {
        Ok(dir) => {
            let _ = std::fs::rename(&events_path, dir.join("logs").join("events.jsonl"));
            if interrupted.load(Ordering::SeqCst) {
                eprintln!("kiln: the interrupt came after the module was written; it is kept");
            }
            if !a.json {
                eprintln!("module `{}` built: {}", job.name, dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            keep_events(&events_path, &failed_logs);
            if let Some(id) = failed_logs.file_name() {
                // `kiln logs` looks in the same default output; name any other.
                let output = if a.output == std::path::Path::new("modules") {
                    String::new()
                } else {
                    format!(" --output {}", a.output.display())
                };
                eprintln!(
                    "the build's logs are kept in {} (`kiln logs {}{output}` shows them)",
                    failed_logs.display(),
                    id.to_string_lossy()
                );
            }
            // After a Ctrl-C, whatever error the stopped VMs report is its consequence.
            if interrupted.load(Ordering::SeqCst) {
                eprintln!("error: the build was cancelled; no module was written");
                return Ok(ExitCode::from(130));
            }
            Err(anyhow::Error::new(e).context(format!(
                "building module `{}` failed; no module was written",
                job.name
            )))
        }
    }
}

/// Files the event log with the failed build's other logs (the build moved those).
fn keep_events(events: &std::path::Path, dir: &std::path::Path) {
    let r = crate::build_logs::make_failed_dir(dir)
        .and_then(|()| std::fs::rename(events, dir.join(crate::build_logs::EVENTS_FILE)));
    if let Err(e) = r {
        tracing::warn!("keeping {} in {}: {e}", events.display(), dir.display());
    }
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The VM whose handbuild step waits.
    pub vm: String,
}

/// `kiln resume <vm>`: ends the handbuild pause of a running build's VM.
pub fn resume(a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let root = build::runtime_root()?;
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for build in rd.flatten() {
            let d = build.path().join(&a.vm);
            if d.is_dir() {
                hits.push(d);
            }
        }
    }
    match hits.as_slice() {
        [] => anyhow::bail!("no running build has a VM named `{}`", a.vm),
        [d] => {
            std::fs::write(d.join("resume"), b"")
                .with_context(|| format!("writing {}", d.display()))?;
            eprintln!("resumed `{}`", a.vm);
            Ok(ExitCode::SUCCESS)
        }
        _ => anyhow::bail!("several running builds have a VM named `{}`", a.vm),
    }
}
