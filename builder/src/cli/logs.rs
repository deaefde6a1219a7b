//! `kiln logs`: the logs of a build, failed or cancelled (kept in `<output>/.logs/<id>/`) or
//! built (its module's `logs/`): events as lines, each VM's step output, serial log paths.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use crate::build_logs::{self, KeptBuild, EVENTS_FILE};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A build id (a failed build prints it), or a module name for its latest build.
    #[arg(required_unless_present = "list")]
    pub build: Option<String>,
    /// List the builds whose logs are kept, oldest first.
    #[arg(long)]
    pub list: bool,
    /// The output folder the builds wrote to.
    #[arg(long, short = 'o', env = "KILN_MODULES", default_value = "modules")]
    pub output: PathBuf,
}

pub fn logs(a: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if a.list {
        for b in build_logs::list(&a.output) {
            writeln!(
                out,
                "{}\t{}\t{}",
                b.id,
                if b.failed { "failed" } else { "built" },
                b.dir.display()
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(what) = a.build.as_deref() else {
        bail!("name a build, or use --list");
    };
    let Some(b) = build_logs::find(&a.output, what) else {
        bail!(
            "no build `{what}` with logs in {} (`kiln logs --list` lists them)",
            a.output.display()
        );
    };
    show(&mut out, &b)?;
    Ok(ExitCode::SUCCESS)
}

fn show(out: &mut impl Write, b: &KeptBuild) -> anyhow::Result<()> {
    writeln!(
        out,
        "build {} ({}), logs in {}",
        b.id,
        if b.failed { "failed" } else { "built" },
        b.dir.display()
    )?;
    let events = b.dir.join(EVENTS_FILE);
    if let Ok(text) = std::fs::read_to_string(&events) {
        writeln!(out, "--- events ({})", events.display())?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "{}", event_line(line))?;
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&b.dir)
        .with_context(|| format!("reading {}", b.dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != EVENTS_FILE))
        .collect();
    files.sort();
    for p in files {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(vm) = name.strip_suffix("-serial.log") {
            writeln!(out, "--- serial console of {vm}: {}", p.display())?;
        } else if let Some(vm) = name.strip_suffix(".log") {
            writeln!(out, "--- step output of {vm} ({})", p.display())?;
            copy_file(out, &p)?;
        } else {
            writeln!(out, "--- {}", p.display())?;
        }
    }
    Ok(())
}

fn copy_file(out: &mut impl Write, p: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    std::io::copy(&mut f, out).with_context(|| format!("reading {}", p.display()))?;
    Ok(())
}

/// One JSON event as a readable line: `[vm] kind key=value ...: message`. Fields are shown
/// as they come, so events of other kiln versions read too.
fn event_line(line: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut s = String::new();
    if let Some(vm) = map.get("vm").filter(|v| !v.is_null()) {
        s.push_str(&format!("[{}] ", text(vm)));
    }
    s.push_str(&map.get("event").map(text).unwrap_or_else(|| "event".into()));
    for (k, v) in &map {
        if matches!(k.as_str(), "event" | "vm" | "message") || v.is_null() {
            continue;
        }
        s.push_str(&format!(" {k}={}", text(v)));
    }
    if let Some(m) = map.get("message").filter(|v| !v.is_null()) {
        s.push_str(&format!(": {}", text(m)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_lines() {
        let l = event_line(
            r#"{"event":"stepFinished","vm":"box","index":1,"step":"breaks","ok":false,"durationMs":5,"message":"exit 3"}"#,
        );
        assert!(l.starts_with("[box] stepFinished "), "{l}");
        assert!(l.contains("step=breaks") && l.contains("ok=false"), "{l}");
        assert!(l.ends_with(": exit 3"), "{l}");
        assert_eq!(event_line("not json"), "not json");
    }

    #[test]
    fn show_prints_events_step_output_and_serial_paths() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("web-20261207-000000");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join(EVENTS_FILE),
            "{\"event\":\"build\",\"phase\":\"Failed\"}\n",
        )
        .unwrap();
        std::fs::write(dir.join("box.log"), "box| about to fail\n").unwrap();
        std::fs::write(dir.join("box-serial.log"), "SECRET console\n").unwrap();
        let b = KeptBuild {
            id: "web-20261207-000000".into(),
            module: "web".into(),
            failed: true,
            dir: dir.clone(),
            when: None,
        };
        let mut v = Vec::new();
        show(&mut v, &b).unwrap();
        let s = String::from_utf8(v).unwrap();
        assert!(s.contains("build phase=Failed"), "{s}");
        assert!(s.contains("box| about to fail"), "{s}");
        assert!(
            s.contains(&dir.join("box-serial.log").display().to_string()),
            "{s}"
        );
        assert!(!s.contains("SECRET"), "{s}");
    }
}
