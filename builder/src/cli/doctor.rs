//! `kiln doctor`: can I build here? kiln-vmm's KVM probe and smoke test, the engine
//! `--engine auto` picks, and [`crate::doctor`]'s findings (QEMU, the agent, tools, root,
//! firmware, the cache and runtime folders), each with its fix; exits 1 when no build can run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::doctor::{Finding, Status};

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

pub fn run(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    use crate::engine::{self, EngineChoice};
    use std::io::Write;
    let probe = kiln_vmm::doctor::probe();
    let smoke = smoke_test(&a, &probe)?;
    let firmware = engine::firmware::HostFirmware::find().report(engine::firmware::package_version);
    // What a build's `--engine auto` would pick now: it reads the result just cached.
    let pick = engine::pick(EngineChoice::Auto, &probe, None);
    let auto_is_kvm = pick.engine == EngineChoice::Kvm;
    let auto = AutoReport {
        engine: if auto_is_kvm { "kvm" } else { "qemu" },
        why: pick.why,
    };
    let checks = crate::doctor::check_host(&crate::doctor::HostInputs {
        auto_is_kvm,
        firmware: &firmware,
        probe: &probe,
    });
    let can_build = crate::doctor::can_build(&checks);
    let text = if a.json {
        let report = DoctorReport {
            probe: &probe,
            smoke: &smoke,
            firmware: &firmware,
            auto: &auto,
            checks: &checks,
            can_build,
        };
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        format!(
            "{}{}engine (auto):     {}: {}\n{}\n{}",
            probe.report_facts(),
            smoke.lines(),
            auto.engine,
            auto.why,
            firmware.lines(),
            findings_text(&checks, can_build)
        )
    };
    // A closed stdout (`kiln doctor | head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(if can_build {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line a finding, its fix indented below, then the verdict.
fn findings_text(checks: &[Finding], can_build: bool) -> String {
    let mut s = String::new();
    for f in checks {
        let mark = match f.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!("{mark}  {:<16} {}\n", f.check, f.found));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("      {:<16} fix: {fix}\n", ""));
        }
    }
    let count = |st: Status| checks.iter().filter(|f| f.status == st).count();
    if can_build {
        s.push_str(&format!(
            "kiln can build here ({} warning{})\n",
            count(Status::Warn),
            if count(Status::Warn) == 1 { "" } else { "s" }
        ));
    } else {
        s.push_str(&format!(
            "kiln cannot build here: fix the {} FAIL finding{} above\n",
            count(Status::Fail),
            if count(Status::Fail) == 1 { "" } else { "s" }
        ));
    }
    s
}

/// `kiln doctor --json`: the probe's fields at the top level (as before the smoke test and
/// firmware were added), then `smoke`, `firmware`, `auto`, the findings and the verdict.
#[derive(serde::Serialize)]
struct DoctorReport<'a> {
    #[serde(flatten)]
    probe: &'a kiln_vmm::doctor::Probe,
    smoke: &'a SmokeReport,
    firmware: &'a crate::engine::firmware::FirmwareReport,
    auto: &'a AutoReport,
    checks: &'a [Finding],
    can_build: bool,
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
