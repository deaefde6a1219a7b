//! What a build reports while it runs: the phases of shared/MANIFEST.md, step starts and ends,
//! guest output lines and download progress. One [`Event`] stream feeds both the human display
//! (one progress line per VM) and `--json` (one JSON object per line on stdout), so both views
//! always agree.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Phases of the whole build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BuildPhase {
    Pending,
    Networking,
    Building,
    CapturingDisks,
    Succeeded,
    Failed,
}

/// Phases of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmPhase {
    Pending,
    SourceImporting,
    Booting,
    BootCommand,
    Provisioning,
    ShuttingDown,
    DiskCaptured,
    Succeeded,
    Failed,
}

/// Which guest stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One thing that happened during a build.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    #[serde(rename_all = "camelCase")]
    Build {
        phase: BuildPhase,
        elapsed_ms: u64,
        message: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Vm {
        vm: String,
        phase: VmPhase,
        elapsed_ms: u64,
        message: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    StepStarted {
        vm: String,
        index: usize,
        step: String,
        kind: String,
    },
    #[serde(rename_all = "camelCase")]
    StepOutput {
        vm: String,
        step: String,
        stream: Stream,
        line: String,
    },
    #[serde(rename_all = "camelCase")]
    StepFinished {
        vm: String,
        index: usize,
        step: String,
        ok: bool,
        duration_ms: u64,
        message: Option<String>,
    },
    /// Something worth a line of its own (engine choice, cache hit, warnings).
    #[serde(rename_all = "camelCase")]
    Note { vm: Option<String>, message: String },
    /// Bytes done of a long transfer (download, capture).
    #[serde(rename_all = "camelCase")]
    Progress {
        vm: Option<String>,
        what: String,
        done: u64,
        total: Option<u64>,
    },
}

/// Where events go. Implementations must be cheap: events come from VM threads.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// `--json`: one compact JSON object per line on stdout.
pub struct JsonSink {
    out: Mutex<std::io::Stdout>,
}

impl JsonSink {
    pub fn new() -> Self {
        Self {
            out: Mutex::new(std::io::stdout()),
        }
    }
}

impl Default for JsonSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for JsonSink {
    fn emit(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            // A closed stdout (`| head`) must not stop the build.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// The terminal view: one status line per VM with its phase and the time spent in it, and
/// guest output printed above them, prefixed with the VM's name.
pub struct HumanSink {
    multi: indicatif::MultiProgress,
    bars: Mutex<BTreeMap<String, (indicatif::ProgressBar, Instant)>>,
    start: Instant,
}

impl HumanSink {
    pub fn new() -> Self {
        Self {
            multi: indicatif::MultiProgress::new(),
            bars: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
        }
    }

    fn bar(&self, vm: &str) -> indicatif::ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.entry(vm.to_string())
            .or_insert_with(|| {
                let pb = self.multi.add(indicatif::ProgressBar::new_spinner());
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix:<12} {msg} [{elapsed}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                pb.set_style(style);
                pb.set_prefix(vm.to_string());
                pb.enable_steady_tick(Duration::from_millis(200));
                (pb, Instant::now())
            })
            .0
            .clone()
    }

    fn println(&self, line: &str) {
        // MultiProgress::println prints nothing when stderr is not a terminal.
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

impl Default for HumanSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for HumanSink {
    fn emit(&self, event: &Event) {
        match event {
            Event::Build { phase, message, .. } => {
                let t = self.start.elapsed().as_secs_f64();
                let msg = message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                self.println(&format!("[{t:7.1}s] build {phase:?}{msg}"));
            }
            Event::Vm {
                vm, phase, message, ..
            } => {
                let pb = self.bar(vm);
                let msg = message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default();
                pb.set_message(format!("{phase:?}{msg}"));
                let t = self.start.elapsed().as_secs_f64();
                self.println(&format!("[{t:7.1}s] {vm}: {phase:?}{msg}"));
                if matches!(phase, VmPhase::Succeeded | VmPhase::Failed) {
                    pb.finish();
                }
            }
            Event::StepStarted {
                vm,
                index,
                step,
                kind,
            } => {
                self.bar(vm)
                    .set_message(format!("step {} {step} ({kind})", index + 1));
                self.println(&format!("{vm}: ==> step {} '{step}' ({kind})", index + 1));
            }
            Event::StepOutput { vm, line, .. } => self.println(&format!("{vm}| {line}")),
            Event::StepFinished {
                vm,
                step,
                ok,
                duration_ms,
                message,
                ..
            } => {
                let status = if *ok { "ok" } else { "FAILED" };
                let msg = message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                self.println(&format!(
                    "{vm}: <== step '{step}' {status} in {:.1}s{msg}",
                    *duration_ms as f64 / 1000.0
                ));
            }
            Event::Note { vm, message } => match vm {
                Some(vm) => self.println(&format!("{vm}: {message}")),
                None => self.println(message),
            },
            Event::Progress {
                vm,
                what,
                done,
                total,
            } => {
                let key = vm.clone().unwrap_or_else(|| "kiln".into());
                let pb = self.bar(&key);
                let done_mib = *done as f64 / (1 << 20) as f64;
                match total {
                    Some(t) if *t > 0 => pb.set_message(format!(
                        "{what} {done_mib:.0}/{:.0} MiB",
                        *t as f64 / (1 << 20) as f64
                    )),
                    _ => pb.set_message(format!("{what} {done_mib:.0} MiB")),
                }
            }
        }
    }
}

/// Collects events in memory: for tests and for the per-build summary.
#[derive(Default)]
pub struct MemorySink {
    pub events: Mutex<Vec<Event>>,
}

impl EventSink for MemorySink {
    fn emit(&self, event: &Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
    }
}

/// Sends every event to several sinks (the display and the build log).
pub struct Tee(pub Vec<std::sync::Arc<dyn EventSink>>);

impl EventSink for Tee {
    fn emit(&self, event: &Event) {
        for s in &self.0 {
            s.emit(event);
        }
    }
}

/// Appends events as JSON lines to a file (the module's `logs/events.jsonl`).
pub struct FileSink {
    file: Mutex<std::fs::File>,
}

impl FileSink {
    /// Creates the log 0600: events may quote step output.
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            file: Mutex::new(crate::build_logs::create(path)?),
        })
    }
}

impl EventSink for FileSink {
    fn emit(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Milliseconds, saturating: for event fields.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_tagged_and_camel_case() {
        let e = Event::Vm {
            vm: "web".into(),
            phase: VmPhase::SourceImporting,
            elapsed_ms: 12,
            message: None,
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "vm");
        assert_eq!(v["phase"], "SourceImporting");
        assert_eq!(v["elapsedMs"], 12);
        let e = Event::StepFinished {
            vm: "web".into(),
            index: 0,
            step: "greet".into(),
            ok: false,
            duration_ms: 5,
            message: Some("exit 3".into()),
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "stepFinished");
        assert_eq!(v["durationMs"], 5);
        assert_eq!(v["ok"], false);
    }
}
