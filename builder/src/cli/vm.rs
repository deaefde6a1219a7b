//! `kiln vm run` and `kiln doctor`. The VMM child (`kiln __vmm`) branches off in `main.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kiln_vmm::exit::ExitReason;
use kiln_vmm::process::protocol::exit_code;
use kiln_vmm::process::{VmProcess, VmSpec};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot one VM from a kernel by hand, in its own VMM process.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnReset {
    /// End with the reason "reset".
    Exit,
    /// Boot the VM again in a fresh VMM process.
    Restart,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: a bzImage or an ELF vmlinux (PVH entry used when present).
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// A disk image (raw or qcow2) offered as virtio-blk; repeat for more.
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub mem: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Also show the serial console on this terminal (and type into it).
    #[arg(long)]
    pub console: bool,
    /// Append the serial console to this file.
    #[arg(long, default_value = "kiln-vm-console.log")]
    pub console_log: PathBuf,
    /// What a guest reboot does.
    #[arg(long, value_enum, default_value_t = OnReset::Exit)]
    pub on_reset: OnReset,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Run the kvm smoke test even where the probe says KVM cannot run a stock kernel.
    #[arg(long)]
    pub smoke: bool,
    /// Run the smoke test again instead of reusing its cached result.
    #[arg(long)]
    pub recheck: bool,
    /// The kernel the smoke test boots (default: the newest bootstrapped base's, else the
    /// host's /boot/vmlinuz-$(uname -r)).
    #[arg(long, value_name = "PATH")]
    pub smoke_kernel: Option<PathBuf>,
}

pub fn run(c: VmCommand) -> anyhow::Result<ExitCode> {
    match c {
        VmCommand::Run(a) => run_vm(a),
    }
}

fn run_vm(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mem_size = kiln_vmm::memory::parse_size(&a.mem)
        .with_context(|| format!("--mem {:?}: expected a size such as 512M or 2G", a.mem))?;
    let spec = VmSpec {
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: Some(a.cmdline.clone()),
        disks: a
            .disk
            .iter()
            .map(kiln_vmm::process::protocol::DiskSpec::writable)
            .collect(),
        mem_size,
        vcpus: a.cpus,
        console_log: Some(a.console_log.clone()),
        console_terminal: a.console,
        ..VmSpec::default()
    };
    let exe = std::env::current_exe().context("finding the kiln binary to run the VMM")?;
    loop {
        let socket = kiln_vmm::process::parent::default_socket_path();
        let mut p = VmProcess::spawn(&exe, &spec, &socket).context("starting the VMM process")?;
        p.start().context("booting the VM")?;
        let reason = p.wait().context("waiting for the VM")?;
        eprintln!(
            "kiln: VM ended: {reason} (console log: {})",
            a.console_log.display()
        );
        if reason == ExitReason::Reset && a.on_reset == OnReset::Restart {
            eprintln!("kiln: restarting the VM");
            continue;
        }
        return Ok(ExitCode::from(exit_code(&reason) as u8));
    }
}

pub fn doctor(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    use crate::engine::{self, EngineChoice};
    use std::io::Write;
    let probe = kiln_vmm::doctor::probe();
    let smoke = smoke_test(&a, &probe)?;
    let firmware = engine::firmware::HostFirmware::find().report(engine::firmware::package_version);
    // What a build's `--engine auto` would pick now: it reads the result just cached.
    let pick = engine::pick(EngineChoice::Auto, &probe, None);
    let auto = AutoReport {
        engine: if pick.engine == EngineChoice::Kvm {
            "kvm"
        } else {
            "qemu"
        },
        why: pick.why,
    };
    let text = if a.json {
        let report = DoctorReport {
            probe: &probe,
            smoke: &smoke,
            firmware: &firmware,
            auto: &auto,
        };
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        format!(
            "{}{}engine (auto):     {}: {}\n{}",
            probe.report_facts(),
            smoke.lines(),
            auto.engine,
            auto.why,
            firmware.lines()
        )
    };
    // A closed stdout (`kiln doctor | head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// `kiln doctor --json`: the probe's fields at the top level (as before the smoke test and
/// firmware were added), then `smoke`, `firmware` and `auto`.
#[derive(serde::Serialize)]
struct DoctorReport<'a> {
    #[serde(flatten)]
    probe: &'a kiln_vmm::doctor::Probe,
    smoke: &'a SmokeReport,
    firmware: &'a crate::engine::firmware::FirmwareReport,
    auto: &'a AutoReport,
}

/// The engine `--engine auto` picks here, and why.
#[derive(serde::Serialize)]
struct AutoReport {
    engine: &'static str,
    why: String,
}

/// The smoke test as `kiln doctor` reports it.
#[derive(serde::Serialize)]
struct SmokeReport {
    /// A result exists for this host kernel and kiln version (run now or earlier).
    ran: bool,
    /// It was read from the cache rather than run now.
    cached: bool,
    passed: Option<bool>,
    /// Why it passed or failed, or why it was not run.
    reason: String,
    when: Option<String>,
    kernel: Option<PathBuf>,
    kernel_sha256: Option<String>,
    seconds: Option<f64>,
    console_tail: Option<String>,
    /// For the text report.
    #[serde(skip)]
    record: Option<crate::engine::kvm_smoke::SmokeRecord>,
}

impl SmokeReport {
    fn not_run(reason: impl Into<String>) -> Self {
        SmokeReport {
            ran: false,
            cached: false,
            passed: None,
            reason: reason.into(),
            when: None,
            kernel: None,
            kernel_sha256: None,
            seconds: None,
            console_tail: None,
            record: None,
        }
    }

    fn of(r: crate::engine::kvm_smoke::SmokeRecord, cached: bool) -> Self {
        SmokeReport {
            ran: true,
            cached,
            passed: Some(r.passed),
            reason: r.reason.clone(),
            when: Some(r.when.clone()),
            kernel: Some(r.kernel.clone()),
            kernel_sha256: Some(r.kernel_sha256.clone()),
            seconds: Some(r.seconds),
            console_tail: Some(r.console_tail.clone()),
            record: Some(r),
        }
    }

    fn lines(&self) -> String {
        let Some(r) = &self.record else {
            return format!("smoke test:        {}\n", self.reason);
        };
        let mut s = format!(
            "smoke test:        {} on {}{}: {} (kernel {}, {:.1} s)\n",
            if r.passed { "passed" } else { "failed" },
            r.when,
            if self.cached { " (cached)" } else { "" },
            r.reason,
            r.kernel.display(),
            r.seconds
        );
        if !r.passed {
            if let Some(last) = r.console_tail.lines().last() {
                s.push_str(&format!("console (last):    {last}\n"));
            }
        }
        s
    }
}

/// Runs the smoke test where the probe says it can pass (or `--smoke`), reusing the cached
/// result for the same kernel unless `--recheck`.
fn smoke_test(a: &DoctorArgs, probe: &kiln_vmm::doctor::Probe) -> anyhow::Result<SmokeReport> {
    use crate::engine::kvm_smoke;
    let root = crate::cache::Cache::root_from_env()?;
    let dir = kvm_smoke::results_dir(&root);
    if !(a.smoke || probe.stock_kernel_ok) {
        return Ok(match kvm_smoke::latest_here(&dir) {
            Some(r) => SmokeReport::of(r, true),
            None => SmokeReport::not_run(
                "not run: the probe says KVM cannot run a stock kernel here (`kiln doctor \
                     --smoke` runs it anyway)",
            ),
        });
    }
    let kernel = match &a.smoke_kernel {
        Some(p) => kvm_smoke::SmokeKernel {
            path: p.clone(),
            origin: "--smoke-kernel".into(),
        },
        None => match kvm_smoke::find_kernel(&root) {
            Some(k) => k,
            None => return Ok(SmokeReport::not_run(kvm_smoke::NO_KERNEL)),
        },
    };
    let (kernel, origin) = (kernel.path, kernel.origin);
    let key = kvm_smoke::SmokeKey::for_kernel(&kernel)
        .with_context(|| format!("reading the smoke-test kernel {}", kernel.display()))?;
    if !a.recheck {
        if let Some(r) = kvm_smoke::read(&dir, &key) {
            return Ok(SmokeReport::of(r, true));
        }
    }
    eprintln!(
        "kiln doctor: smoke test: booting {} ({origin}) in kiln's VMM (at most {} s)",
        kernel.display(),
        kiln_vmm::smoke::DEFAULT_TIMEOUT.as_secs()
    );
    let cache = crate::cache::Cache::from_env()?;
    let r = kvm_smoke::run_and_cache(&cache, &kernel, kiln_vmm::smoke::DEFAULT_TIMEOUT)?;
    Ok(SmokeReport::of(r, false))
}
