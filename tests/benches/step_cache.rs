//! Benchmark of the step cache (issue 21): a module whose first steps do a minute or more of
//! real work under TCG and whose last step is edited between builds, built cold (`--no-cache`)
//! and then again with the last step edited, side by side in one run. Prints both wall
//! times, their ratio (target: the rebuild at most 0.4 of the cold build) and what each
//! checkpoint cost.
//!
//! `cargo bench -p kiln-e2e --bench step_cache [-- ROUNDS]`. Needs root, qemu, mmdebstrap and
//! the static agent (as the e2e tests); without one it prints `SKIP: <reason>` and exits 0.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

/// The early steps' work: data made and digested again and again (CPU and disk in the guest,
/// nothing from a network), the kind of time package installs take.
fn manifest(last: &str) -> String {
    format!(
        r#"vms:
  - name: box
    source:
      bootstrap: {{ distro: debian, suite: bookworm, packages: [] }}
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: make-data
        type: shell
        shell:
          inline: |
            set -eu
            mkdir -p /opt/work
            head -c 64M /dev/urandom > /opt/work/data
            for i in $(seq 1 12); do sha256sum /opt/work/data >> /opt/work/sums; done
      - name: pack
        type: shell
        shell:
          inline: |
            set -eu
            for i in $(seq 1 4); do gzip -1 -c /opt/work/data | sha256sum >> /opt/work/sums; done
            rm /opt/work/data
      - name: last
        type: shell
        shell:
          inline: echo "{last}" > /etc/kiln-last
"#
    )
}

struct Build {
    wall: Duration,
    /// Steps run, 0-based.
    ran: Vec<usize>,
    /// (step index, durationMs, frozenMs, diskMs, bytes) of each checkpoint.
    checkpoints: Vec<(usize, u64, u64, u64, u64)>,
    /// Each step's own time, ms.
    steps: Vec<(usize, u64)>,
}

fn build(kiln: &Path, dir: &Path, text: &str, no_cache: bool) -> Res<Build> {
    let manifest = dir.join("cachebench.yaml");
    std::fs::write(&manifest, text).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(kiln);
    cmd.arg("build")
        .arg(&manifest)
        .args(["--json", "--force", "--engine", "qemu", "--output"])
        .arg(dir.join("modules"))
        .env("KILN_NO_INTERNET", "true")
        .stdin(Stdio::null());
    if no_cache {
        cmd.arg("--no-cache");
    }
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("running kiln: {e}"))?;
    let wall = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let tail: Vec<&str> = stdout.lines().rev().take(20).collect();
        return Err(format!(
            "kiln build failed ({}):\n{}\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut b = Build {
        wall,
        ran: vec![],
        checkpoints: vec![],
        steps: vec![],
    };
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        match v["event"].as_str() {
            Some("stepStarted") => b.ran.push(n("index") as usize),
            Some("stepFinished") => b.steps.push((n("index") as usize, n("durationMs"))),
            Some("checkpoint") => b.checkpoints.push((
                n("index") as usize,
                n("durationMs"),
                n("frozenMs"),
                n("diskMs"),
                n("bytes"),
            )),
            _ => {}
        }
    }
    Ok(b)
}

fn prereqs() -> Res<PathBuf> {
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mmdebstrap", "mmdebstrap"),
    ] {
        if !kiln_e2e::on_path(prog) {
            return Err(format!(
                "`{prog}` is not installed (Debian package `{pkg}`)"
            ));
        }
    }
    if !kiln_e2e::is_root() {
        return Err("kiln's bootstrap base (mmdebstrap) needs root".into());
    }
    let kiln = match std::env::var_os("KILN_BIN") {
        Some(k) => PathBuf::from(k),
        None => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let k = exe
                .parent()
                .and_then(|d| d.parent())
                .map(|d| d.join("kiln"))
                .ok_or("no target folder")?;
            if !k.is_file() {
                return Err(
                    "the kiln binary is not built beside this bench: `cargo build --release -p \
                     kiln-builder` first, or set KILN_BIN"
                        .into(),
                );
            }
            k
        }
    };
    Ok(kiln)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn run(kiln: &Path, rounds: usize) -> Res<()> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path();
    // A warm-up build makes sure the bootstrap base is cached (not counted).
    eprintln!("step cache bench: warm-up build (load {})", loadavg());
    build(kiln, dir, &manifest("warm-up"), true)?;
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        eprintln!(
            "step cache bench: round {round}: cold build (load {})",
            loadavg()
        );
        let cold = build(kiln, dir, &manifest(&format!("cold {round}")), true)?;
        eprintln!("step cache bench: round {round}: rebuild, last step edited");
        let re = build(kiln, dir, &manifest(&format!("edited {round}")), false)?;
        if re.ran != vec![2] {
            return Err(format!(
                "the rebuild ran steps {:?}: only the edited last step (2) should have run",
                re.ran
            ));
        }
        let early: u64 = cold
            .steps
            .iter()
            .filter(|(i, _)| *i < 2)
            .map(|(_, ms)| ms)
            .sum();
        let ratio = re.wall.as_secs_f64() / cold.wall.as_secs_f64();
        ratios.push(ratio);
        println!(
            "round {round}: cold {:.1} s (early steps {:.1} s), rebuild {:.1} s: rebuild/cold {:.3} (target <= 0.4), load {}",
            cold.wall.as_secs_f64(),
            early as f64 / 1000.0,
            re.wall.as_secs_f64(),
            ratio,
            loadavg()
        );
        for (i, total, frozen, disk, bytes) in cold.checkpoints.iter().chain(&re.checkpoints) {
            println!(
                "  checkpoint after step {}: {total} ms ({frozen} ms frozen, {disk} ms in the block layer), {:.1} MiB",
                i + 1,
                *bytes as f64 / (1 << 20) as f64
            );
        }
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    println!(
        "rebuild/cold over {rounds} rounds: min {:.3}, median {:.3}, max {:.3}",
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );
    Ok(())
}

fn main() {
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let kiln = match prereqs() {
        Ok(k) => k,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    if let Err(e) = run(&kiln, rounds) {
        eprintln!("step cache bench failed: {e}");
        std::process::exit(1);
    }
}
