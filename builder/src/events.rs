//! What a build reports while it runs: the phases of docs/manifest.md, step starts and ends,
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
    /// The step cache gave the VM its first `steps` (0-based indexes; reboots included)
    /// from `layers` (keys, bottom first): they do not run. `saved_ms`: how long they ran
    /// when the layers were made.
    #[serde(rename_all = "camelCase")]
    StepsCached {
        vm: String,
        steps: Vec<usize>,
        layers: Vec<String>,
        saved_ms: u64,
    },
    /// After step `index` the VM's disks became the layer `key`: `bytes` in the layer,
    /// guest file systems frozen for `frozen_ms` of the checkpoint's `duration_ms`, of which
    /// `disk_ms` in kiln's block layer (overlays swapped, the layer hashed and published).
    #[serde(rename_all = "camelCase")]
    Checkpoint {
        vm: String,
        index: usize,
        key: String,
        bytes: u64,
        frozen_ms: u64,
        disk_ms: u64,
        duration_ms: u64,
        /// False when the cache had a whole layer of that key already (this one stays the
        /// build's own).
        published: bool,
    },
    /// The command failed (under `--json`, its last line): the error with its causes, and
    /// for an invalid manifest every diagnostic with its file, line and column.
    #[serde(rename_all = "camelCase")]
    Error {
        message: String,
        diagnostics: Vec<crate::manifest::Diagnostic>,
    },
    /// Bytes done of a long transfer (download, capture).
    #[serde(rename_all = "camelCase")]
    Progress {
        vm: Option<String>,
        what: String,
        done: u64,
        total: Option<u64>,
    },
}

/// Version of the `--json` event lines and of `logs/events.jsonl`: raised when a field is
/// removed or changes meaning (new fields and event kinds do not raise it).
pub const EVENT_SCHEMA: u32 = 1;

/// One event line as written: the schema version and the wall-clock time (RFC 3339, UTC, in
/// milliseconds) before the event's own fields, so lines from several builds can be merged
/// and read months later.
#[derive(Serialize)]
struct Line<'a> {
    schema: u32,
    time: String,
    #[serde(flatten)]
    event: &'a Event,
}

/// `event` as one JSON line (without the newline), stamped now.
pub fn json_line(event: &Event) -> Option<String> {
    serde_json::to_string(&Line {
        schema: EVENT_SCHEMA,
        time: rfc3339_now(),
        event,
    })
    .ok()
}

/// The current time as `2026-12-07T06:57:36.123Z`.
pub(crate) fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

/// Unix seconds as an RFC 3339 UTC time.
fn rfc3339(secs: u64, millis: u32) -> String {
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm: twelve lines instead of a date crate for two formats).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Where events go. Implementations must be cheap: events come from VM threads.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);

    /// Runs `f` with this view off the terminal (a question asked, a shell opened on it);
    /// other events wait until `f` returns.
    fn hold(&self, f: &mut dyn FnMut()) {
        f()
    }
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
        if let Some(line) = json_line(event) {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            // A closed stdout (`| head`) must not stop the build.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Whether to write colour to a stream: only to a terminal, and never when `NO_COLOR` is set
/// to anything non-empty (no-color.org).
pub fn colour_on(stream_is_terminal: bool) -> bool {
    stream_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A guest's output line made safe to print: control characters and escape sequences are
/// dropped (a guest must not move the cursor, retitle or clear the user's terminal), except
/// colour (SGR) sequences when `keep_colour`. Written here rather than taken from a crate
/// because the crates strip every sequence and this keeps colour on a terminal.
pub fn sanitize_guest_line(line: &str, keep_colour: bool) -> String {
    let mut out = String::with_capacity(line.len());
    let mut it = line.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\u{1b}' => match it.peek() {
                // CSI: parameters and intermediates, then one final byte in @..~.
                Some('[') => {
                    it.next();
                    let mut seq = String::from("\u{1b}[");
                    let mut fin = None;
                    for d in it.by_ref() {
                        seq.push(d);
                        if ('@'..='~').contains(&d) {
                            fin = Some(d);
                            break;
                        }
                    }
                    if keep_colour && fin == Some('m') {
                        out.push_str(&seq);
                    }
                }
                // OSC, DCS, APC, PM, SOS: a string ended by BEL or ESC \.
                Some(']' | 'P' | '_' | '^' | 'X') => {
                    it.next();
                    while let Some(d) = it.next() {
                        if d == '\u{7}' || (d == '\u{1b}' && it.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // Any other escape: intermediates (space to /), then one final character.
                Some(_) => {
                    while it.next_if(|d| (' '..='/').contains(d)).is_some() {}
                    it.next();
                }
                None => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The terminal view: one status line per VM with its phase and the time spent in it, and
/// guest output printed above them, prefixed with the VM's name.
pub struct HumanSink {
    multi: indicatif::MultiProgress,
    bars: Mutex<BTreeMap<String, (indicatif::ProgressBar, Instant)>>,
    start: Instant,
    /// Guest colour passes through (stderr is a terminal and NO_COLOR is unset).
    colour: bool,
}

impl HumanSink {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            multi: indicatif::MultiProgress::new(),
            bars: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
            colour: colour_on(std::io::stderr().is_terminal()),
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
    fn hold(&self, f: &mut dyn FnMut()) {
        // The status lines are cleared and redrawn afterwards; their ticks and other VMs'
        // lines wait.
        self.multi.suspend(f)
    }

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
            Event::StepOutput { vm, line, .. } => {
                self.println(&format!("{vm}| {}", sanitize_guest_line(line, self.colour)))
            }
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
            Event::StepsCached {
                vm,
                steps,
                saved_ms,
                ..
            } => self.println(&format!(
                "{vm}: {} from cache, {} saved",
                step_span(steps),
                human_duration(*saved_ms)
            )),
            Event::Checkpoint {
                vm,
                index,
                bytes,
                duration_ms,
                ..
            } => self.println(&format!(
                "{vm}: step {} cached ({:.1} MiB, {:.2}s)",
                index + 1,
                *bytes as f64 / (1 << 20) as f64,
                *duration_ms as f64 / 1000.0
            )),
            Event::Error { message, .. } => self.println(&format!("error: {message}")),
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

/// "steps 1-3" (1-based) for 0-based step indexes in order; "step 2" for one.
pub fn step_span(steps: &[usize]) -> String {
    match steps {
        [] => "no steps".into(),
        [one] => format!("step {}", one + 1),
        [first, .., last] => format!("steps {}-{}", first + 1, last + 1),
    }
}

/// "11 min", "42 s", "1 h 5 min".
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
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

    fn hold(&self, f: &mut dyn FnMut()) {
        fn nest(sinks: &[std::sync::Arc<dyn EventSink>], f: &mut dyn FnMut()) {
            match sinks.split_first() {
                Some((first, rest)) => first.hold(&mut || nest(rest, f)),
                None => f(),
            }
        }
        nest(&self.0, f)
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
            file: Mutex::new(crate::log_file::create(path)?),
        })
    }
}

impl EventSink for FileSink {
    fn emit(&self, event: &Event) {
        if let Some(line) = json_line(event) {
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

    #[test]
    fn every_line_carries_the_schema_and_the_wall_clock_time() {
        let e = Event::Note {
            vm: None,
            message: "hi".into(),
        };
        let before = std::time::SystemTime::now();
        let v: serde_json::Value = serde_json::from_str(&json_line(&e).unwrap()).unwrap();
        assert_eq!(v["schema"], EVENT_SCHEMA);
        assert_eq!(v["event"], "note");
        assert_eq!(v["message"], "hi");
        let t = v["time"].as_str().unwrap();
        // The same second as now (or the next), in RFC 3339 UTC with milliseconds.
        let secs = before
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = [rfc3339(secs, 0), rfc3339(secs + 1, 0)];
        assert!(now.iter().any(|n| n[..19] == t[..19]), "{t} vs {now:?}");
        assert_eq!(t.len(), "2026-12-07T06:57:36.123Z".len(), "{t}");
        assert!(t.ends_with('Z'));
    }

    #[test]
    fn guest_lines_lose_terminal_control_and_keep_colour_only_when_asked() {
        let line =
            "\u{1b}[1;31mred\u{1b}[0m \u{1b}]0;title\u{7}\u{1b}[2J\u{1b}[Hok\r\tx\u{8}\u{1b}(B";
        assert_eq!(sanitize_guest_line(line, false), "red ok\tx");
        assert_eq!(
            sanitize_guest_line(line, true),
            "\u{1b}[1;31mred\u{1b}[0m ok\tx"
        );
        // An unterminated sequence at the end is dropped, not printed half.
        assert_eq!(sanitize_guest_line("a\u{1b}[31", true), "a");
        assert_eq!(sanitize_guest_line("a\u{1b}]0;t\u{1b}\\b", false), "ab");
        assert_eq!(sanitize_guest_line("plain ünïcode", false), "plain ünïcode");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) and the day after.
        assert_eq!(rfc3339(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(
            rfc3339(951_868_800 + 3_661, 999),
            "2000-03-01T01:01:01.999Z"
        );
        assert_eq!(rfc3339(1_796_625_456, 123), "2026-12-07T06:37:36.123Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
    }
}
