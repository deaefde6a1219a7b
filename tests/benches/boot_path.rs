//! Direct kernel boot against firmware boot (issue 19): `examples/hello.yaml` built by kiln
//! three ways in one run, on the same bootstrapped base (which carries boot loaders for both
//! firmwares): `--boot direct` (kiln loads the kernel itself), `--boot firmware` (SeaBIOS and
//! the base's GRUB), and with `efiFirmware: {}` (OVMF and the base's UEFI GRUB). The order
//! rotates each round so no variant always runs on a warmer machine. Prints per variant the
//! median wall time of the whole build, of its first boot (the VM's `Booting` phase until
//! its agent answers) and of its reboot step, and each against direct boot.
//!
//! `cargo build --release -p kiln-builder && cargo bench -p kiln-e2e --bench boot_path [-- ROUNDS]`
//! (default 3 rounds; needs root, qemu-system-x86_64, OVMF, mmdebstrap and the static agent,
//! else it prints `SKIP:`). `KILN_BIN` picks the kiln binary (else `kiln` beside this bench's
//! profile folder).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln_e2e::{is_root, kiln_bin, on_path};

type Res<T> = Result<T, String>;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// One way to build the module.
struct Variant {
    name: &'static str,
    /// The manifest's file stem (the module's name).
    module: &'static str,
    args: &'static [&'static str],
    /// What module.yaml must record: the firmware, and whether the build booted through it.
    expect: (&'static str, bool),
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "direct",
        module: "hello",
        args: &["--boot", "direct"],
        expect: ("bios", false),
    },
    Variant {
        name: "bios",
        module: "hello",
        args: &["--boot", "firmware"],
        expect: ("bios", true),
    },
    Variant {
        name: "uefi",
        module: "hello-uefi",
        args: &[],
        expect: ("uefi", true),
    },
];

/// What one build took, in seconds.
#[derive(Clone, Copy)]
struct Timing {
    total: f64,
    first_boot: f64,
    reboot: f64,
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(3)
        .max(1);
    let kiln = match prereqs() {
        Ok(k) => k,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    if let Err(e) = run(&kiln, rounds) {
        eprintln!("boot_path bench FAILED: {e}");
        std::process::exit(1);
    }
}

fn prereqs() -> Res<PathBuf> {
    if !is_root() {
        return Err("bootstrapping the base needs root".into());
    }
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mmdebstrap", "mmdebstrap"),
    ] {
        if !on_path(prog) {
            return Err(format!("`{prog}` is not installed (Debian package {pkg})"));
        }
    }
    if !Path::new(OVMF_CODE).is_file() {
        return Err(format!("{OVMF_CODE} is missing (Debian package ovmf)"));
    }
    kiln_bin().ok_or_else(|| {
        "the kiln binary is missing: cargo build --release -p kiln-builder (or set KILN_BIN)"
            .to_string()
    })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The manifests in `dir`: hello as shipped, and the same VM with `efiFirmware: {}`.
fn manifests(dir: &Path) -> Res<()> {
    let hello = std::fs::read_to_string(repo_root().join("examples/hello.yaml"))
        .map_err(|e| format!("reading examples/hello.yaml: {e}"))?;
    let vm = "  - name: hello\n";
    if !hello.contains(vm) {
        return Err("examples/hello.yaml no longer has its `hello` VM".into());
    }
    let uefi = hello.replacen(vm, &format!("{vm}    efiFirmware: {{}}\n"), 1);
    for (name, text) in [("hello.yaml", &hello), ("hello-uefi.yaml", &uefi)] {
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))?;
    }
    Ok(())
}

fn run(kiln: &Path, rounds: usize) -> Res<()> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    manifests(dir.path())?;
    let mut timings: Vec<Vec<Timing>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for k in 0..VARIANTS.len() {
            let i = (k + round) % VARIANTS.len();
            let t = build(kiln, dir.path(), &VARIANTS[i])?;
            eprintln!(
                "round {} {:>6}: build {:6.1} s, first boot {:5.1} s, reboot step {:5.1} s",
                round + 1,
                VARIANTS[i].name,
                t.total,
                t.first_boot,
                t.reboot
            );
            timings[i].push(t);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nhello.yaml built {rounds} time(s) each way (qemu engine, TCG); medians; load {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:>8} {:>9} {:>11} {:>11} {:>12} {:>13}",
        "boot", "build s", "1st boot s", "reboot s", "build/direct", "1st boot/dir."
    );
    let med = |v: &[Timing], f: fn(&Timing) -> f64| median(v.iter().map(f).collect());
    let direct = (
        med(&timings[0], |t| t.total),
        med(&timings[0], |t| t.first_boot),
    );
    for (v, t) in VARIANTS.iter().zip(&timings) {
        let (total, boot) = (med(t, |t| t.total), med(t, |t| t.first_boot));
        println!(
            "{:>8} {:9.1} {:11.1} {:11.1} {:12.2} {:13.2}",
            v.name,
            total,
            boot,
            med(t, |t| t.reboot),
            total / direct.0,
            boot / direct.1
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One `kiln build --json` of the variant: its wall time and, from its event stream, the
/// first boot and the reboot step; then checks module.yaml says it booted as asked.
fn build(kiln: &Path, dir: &Path, v: &Variant) -> Res<Timing> {
    let out_dir = dir.join(format!("out-{}", v.name));
    let start = Instant::now();
    let out = Command::new(kiln)
        .arg("build")
        .arg(dir.join(format!("{}.yaml", v.module)))
        // Every step runs, as in a first build: the step cache would skip them.
        .args([
            "--engine",
            "qemu",
            "--json",
            "--force",
            "--no-cache",
            "--output",
        ])
        .arg(&out_dir)
        .args(v.args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", kiln.display()))?;
    let total = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} build failed ({}): {}\n{}",
            v.name,
            out.status,
            stdout.lines().last().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (mut booting, mut provisioning, mut reboot) = (None, None, None);
    for line in stdout.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let ms = |e: &serde_json::Value| e["elapsedMs"].as_f64().map(|m| m / 1000.0);
        match (e["event"].as_str(), e["phase"].as_str()) {
            (Some("vm"), Some("Booting")) if booting.is_none() => booting = ms(&e),
            (Some("vm"), Some("Provisioning")) if provisioning.is_none() => provisioning = ms(&e),
            (Some("stepFinished"), _) if e["step"] == "restart" => {
                reboot = e["durationMs"].as_f64().map(|m| m / 1000.0)
            }
            _ => {}
        }
    }
    let (Some(b), Some(p), Some(reboot)) = (booting, provisioning, reboot) else {
        return Err(format!(
            "{}: the event stream lacks the Booting/Provisioning phases or the reboot step",
            v.name
        ));
    };
    let record = std::fs::read_to_string(out_dir.join(v.module).join("module.yaml"))
        .map_err(|e| format!("{}: reading module.yaml: {e}", v.name))?;
    let want = format!("firmware: {}", v.expect.0);
    let booted = format!("booted: {}", v.expect.1);
    if !record.contains(&want) || !record.contains(&booted) {
        return Err(format!(
            "{}: module.yaml does not record `{want}` and `{booted}`",
            v.name
        ));
    }
    Ok(Timing {
        total,
        first_boot: p - b,
        reboot,
    })
}
