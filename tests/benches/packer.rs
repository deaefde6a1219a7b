//! Benchmark vs Packer (issue 7): the same module built by `kiln build` and by Packer 1.6.6's
//! QEMU builder (SSH communicator), in one run, on the same bootstrapped Debian base disk, the
//! same kernel and initrd (direct kernel boot), the same accelerator (TCG), vCPUs and memory.
//! Prints both wall times, the ratio kiln/packer and the load average, and checks both outputs
//! with `qemu-img check` and by reading the provisioned files back out of them.
//!
//! `cargo bench -p kiln-e2e --bench packer` (needs root, qemu, qemu-img, packer, mmdebstrap,
//! debugfs, ssh-keygen, the kiln binary and its static agent; otherwise it prints `SKIP:`).
//! Fixtures are in `tests/benches/packer/`; tests/README.md ("Benchmark vs Packer") explains
//! the fairness choices and records the numbers.
//!
//! Environment: `KILN_BIN` (else `kiln` beside this bench's profile folder), `KILN_BENCH_KEEP=1`
//! keeps the work folder, `KILN_BENCH_DIR` puts it somewhere else than the system temp folder
//! (made if missing).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{is_root, kiln_bin, on_path};

/// The module's name (the manifest's file stem) and its one VM.
const MODULE: &str = "hello-ssh";
const VM: &str = "bench";

type Res<T> = Result<T, String>;

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter here.
    match prereqs() {
        Ok(tools) => {
            if let Err(e) = run(&tools) {
                eprintln!("packer bench FAILED: {e}");
                std::process::exit(1);
            }
        }
        Err(reason) => eprintln!("SKIP: {reason}"),
    }
}

struct Tools {
    kiln: PathBuf,
    packer_version: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/packer")
}

/// Everything the bench needs; `Err` is the SKIP reason.
fn prereqs() -> Res<Tools> {
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("packer", "packer"),
        ("mmdebstrap", "mmdebstrap"),
        ("debugfs", "e2fsprogs"),
        ("ssh-keygen", "openssh-client"),
    ] {
        if !on_path(prog) {
            return Err(format!(
                "`{prog}` is not installed (Debian package `{pkg}`; scripts/setup.sh installs it)"
            ));
        }
    }
    if !is_root() {
        return Err("kiln's bootstrap base (mmdebstrap) and its capture need root".into());
    }
    let kiln = kiln_bin().ok_or(
        "the kiln binary is not built beside this bench: run `cargo build --release -p kiln-builder` \
         with the same CARGO_TARGET_DIR first, or set KILN_BIN",
    )?;
    // kiln carries its guest agent (or KILN_AGENT_BIN names one): nothing to check.
    let v = run_quiet(Command::new("packer").arg("version"))?;
    let packer_version = String::from_utf8_lossy(&v.stdout).trim().to_string();
    Ok(Tools {
        kiln,
        packer_version,
    })
}

fn run_quiet(cmd: &mut Command) -> Res<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Runs a timed build with its output teed to `log` (and the last lines shown on failure).
fn timed(what: &str, cmd: &mut Command, log: &Path) -> Res<Duration> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    eprintln!(
        "packer bench: {what} (log: {}), load average {}",
        log.display(),
        loadavg()
    );
    let t = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("starting {what}: {e}"))?;
    let d = t.elapsed();
    eprintln!(
        "packer bench: {what} took {:.1} s, load average now {}",
        d.as_secs_f64(),
        loadavg()
    );
    if !st.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        return Err(format!(
            "{what} failed ({st}) after {:.1} s; last lines of {}:\n{}",
            d.as_secs_f64(),
            log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        ));
    }
    Ok(d)
}

fn kiln_cache() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_CACHE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p).join("kiln"));
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/kiln"))
        .ok_or_else(|| "no KILN_CACHE, XDG_CACHE_HOME or HOME".into())
}

/// The bootstrap cache entry a kiln build used: `cacheKey:` in its module.yaml.
fn base_key(module_yaml: &Path) -> Res<String> {
    let text = std::fs::read_to_string(module_yaml)
        .map_err(|e| format!("{}: {e}", module_yaml.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("cacheKey:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .find(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("{}: no bootstrap cacheKey", module_yaml.display()))
}

/// A string field of the bootstrap entry's meta.json (flat `"name": "value"` lines).
fn meta_field(meta: &str, name: &str) -> Option<String> {
    let pat = format!("\"{name}\":");
    meta.lines()
        .filter_map(|l| l.trim().strip_prefix(&pat))
        .map(|v| v.trim().trim_end_matches(',').trim_matches('"').to_string())
        .next()
}

/// What kiln's events say about the base: true when it came from the cache.
fn base_was_cached(events: &Path) -> Res<bool> {
    let text = std::fs::read_to_string(events).map_err(|e| format!("{}: {e}", events.display()))?;
    if text.contains("bootstrap base from the cache") {
        Ok(true)
    } else if text.contains("bootstrapping") || text.contains("mmdebstrap") {
        Ok(false)
    } else {
        Err(format!(
            "{}: neither a cached nor a fresh bootstrap is reported",
            events.display()
        ))
    }
}

/// kiln's template cleanup script, taken from the builder's source so Packer's last step
/// stays the same as kiln's own cleanup (machine-id, SSH host keys, logs, fstrim).
fn kiln_cleanup_script() -> Res<String> {
    let src = repo_root().join("builder/src/build/shutdown.rs");
    let text = std::fs::read_to_string(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let start = "pub const TEMPLATE_CLEANUP: &str = r#\"";
    let i = text
        .find(start)
        .ok_or_else(|| format!("{}: TEMPLATE_CLEANUP not found", src.display()))?
        + start.len();
    let len = text[i..]
        .find("\"#;")
        .ok_or_else(|| format!("{}: TEMPLATE_CLEANUP has no end", src.display()))?;
    Ok(format!("#!/bin/sh\n{}", &text[i..i + len]))
}

/// Packer's copy of the base: the same disk with root's authorized key for the SSH
/// communicator, and kiln's agent unit masked (Packer has no vsock device for it; sshd, which
/// both guests start, is Packer's counterpart). Edited offline with debugfs, like an image
/// prepared for Packer once; not timed, as kiln's bootstrap is not timed.
fn packer_base(base: &Path, work: &Path, pubkey: &Path) -> Res<PathBuf> {
    let raw = work.join("packer-base.raw");
    run_quiet(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(base)
            .arg(&raw),
    )?;
    // The bootstrapped base is a GPT disk: debugfs opens its root partition at its offset.
    let root = kiln_e2e::image::ext4_root(&raw).map_err(|e| e.to_string())?;
    let cmds = work.join("debugfs.cmds");
    let script = format!(
        "mkdir /root/.ssh\n\
         write {} /root/.ssh/authorized_keys\n\
         sif /root/.ssh mode 040700\n\
         sif /root/.ssh uid 0\n\
         sif /root/.ssh gid 0\n\
         sif /root/.ssh/authorized_keys mode 0100600\n\
         sif /root/.ssh/authorized_keys uid 0\n\
         sif /root/.ssh/authorized_keys gid 0\n\
         rm /etc/systemd/system/kiln-agent.service\n\
         symlink /etc/systemd/system/kiln-agent.service /dev/null\n",
        pubkey.display()
    );
    std::fs::write(&cmds, script).map_err(|e| format!("{}: {e}", cmds.display()))?;
    run_quiet(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&root),
    )?;
    // The copy must really hold the key, and the base must have SSH host keys.
    let check = run_quiet(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat /root/.ssh/authorized_keys")
            .arg(&root),
    )?;
    let want = std::fs::read_to_string(pubkey).map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&check.stdout).trim() != want.trim() {
        return Err("debugfs did not write root's authorized_keys into Packer's base".into());
    }
    let ls = run_quiet(
        Command::new("debugfs")
            .arg("-R")
            .arg("ls /etc/ssh")
            .arg(&root),
    )?;
    if !String::from_utf8_lossy(&ls.stdout).contains("ssh_host_ed25519_key") {
        return Err("the base has no SSH host keys in /etc/ssh (is openssh-server in it?)".into());
    }
    let out = work.join("packer-base.qcow2");
    run_quiet(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out),
    )?;
    let _ = std::fs::remove_file(&raw);
    Ok(out)
}

/// A file read out of a captured qcow2's ext4 root (qemu-img to raw, debugfs).
fn guest_file(qcow2: &Path, raw: &Path, path: &str) -> Res<String> {
    if !raw.exists() {
        run_quiet(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(qcow2)
                .arg(raw),
        )?;
    }
    let root = kiln_e2e::image::ext4_root(raw).map_err(|e| e.to_string())?;
    let out = run_quiet(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(&root),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img check`, then the provisioned files read back; returns the file size.
fn verify_output(who: &str, img: &Path, work: &Path) -> Res<u64> {
    let out = run_quiet(Command::new("qemu-img").arg("check").arg(img))
        .map_err(|e| format!("{who}'s output {}: {e}", img.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("No errors were found") {
        return Err(format!(
            "{who}: qemu-img check of {}: {text}",
            img.display()
        ));
    }
    let raw = work.join(format!("{who}-inspect.raw"));
    let hello = guest_file(img, &raw, "/etc/kiln-hello")?;
    let motd = guest_file(img, &raw, "/etc/motd")?;
    let _ = std::fs::remove_file(&raw);
    if hello.trim() != format!("hello from {VM}") || !motd.contains("built by kiln") {
        return Err(format!(
            "{who}'s output lacks the provisioned files: /etc/kiln-hello={hello:?} /etc/motd={motd:?}"
        ));
    }
    let len = std::fs::metadata(img).map_err(|e| e.to_string())?.len();
    eprintln!(
        "packer bench: {who} output {} passes qemu-img check and holds /etc/kiln-hello and /etc/motd",
        img.display()
    );
    Ok(len)
}

/// A number or string field of one JSON event line (kiln's flat events.jsonl).
fn json_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("\"{name}\":");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let rest = rest.trim_start();
    if let Some(r) = rest.strip_prefix('"') {
        r.find('"').map(|e| &r[..e])
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim())
    }
}

/// Where kiln's time went, from its events: boot until the agent answers, each step,
/// cleanup + power-off, capture.
fn kiln_phases(events: &Path) -> String {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    let mut at = std::collections::BTreeMap::new();
    let mut steps = Vec::new();
    for l in text.lines() {
        match json_field(l, "event") {
            Some("vm") | Some("build") => {
                if let (Some(p), Some(ms)) = (json_field(l, "phase"), json_field(l, "elapsedMs")) {
                    if let Ok(ms) = ms.parse::<f64>() {
                        at.entry(p.to_string()).or_insert(ms / 1000.0);
                    }
                }
            }
            Some("stepFinished") => {
                if let (Some(n), Some(ms)) = (json_field(l, "step"), json_field(l, "durationMs")) {
                    if let Ok(ms) = ms.parse::<f64>() {
                        steps.push(format!("{n} {:.1}", ms / 1000.0));
                    }
                }
            }
            _ => {}
        }
    }
    let span = |a: &str, b: &str| match (at.get(a), at.get(b)) {
        (Some(x), Some(y)) => format!("{:.1}", y - x),
        _ => "?".into(),
    };
    format!(
        "boot {} | steps: {} | cleanup+power-off {} | capture {}",
        span("Booting", "Provisioning"),
        steps.join(", "),
        span("ShuttingDown", "CapturingDisks"),
        span("CapturingDisks", "Succeeded"),
    )
}

/// Where Packer's time went, from its `-timestamp-ui` log (1 s resolution): boot until SSH
/// answers, the module's steps (reboot included), cleanup + halt, and the compressing
/// conversion (until Packer exits).
fn packer_phases(log: &Path, total: f64) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // "2026-11-26T18:58:04Z: ==> qemu: ..." -> seconds of the day.
    let stamp = |l: &str| -> Option<f64> {
        let t = l.get(11..19)?;
        let mut it = t.split(':').map(|x| x.parse::<f64>().ok());
        Some(it.next()?? * 3600.0 + it.next()?? * 60.0 + it.next()??)
    };
    let Some(first) = text.lines().find_map(stamp) else {
        return "no timestamps in the log".into();
    };
    let rel = |l: &str| stamp(l).map(|t| (t - first).rem_euclid(86400.0));
    let find = |needle: &str| text.lines().find(|l| l.contains(needle)).and_then(rel);
    // The last shell step is the template cleanup.
    let cleanup = text
        .lines()
        .rfind(|l| l.contains("Provisioning with shell script: "))
        .and_then(rel);
    let start = find("Starting VM");
    let ssh = find("Connected to SSH");
    let convert = find("Converting hard drive");
    let span = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => format!("{:.0}", y - x),
        _ => "?".into(),
    };
    format!(
        "prepare {} | boot {} | steps {} | cleanup+halt {} | convert {}",
        span(Some(0.0), start),
        span(start, ssh),
        span(ssh, cleanup),
        span(cleanup, convert),
        span(convert, Some(total)),
    )
}

fn run(tools: &Tools) -> Res<()> {
    if !tools.packer_version.contains("1.6.6") {
        eprintln!(
            "packer bench: WARNING: {} is not the Packer 1.6.6 the comparison is specified for",
            tools.packer_version
        );
    }
    let mut b = tempfile::Builder::new();
    b.prefix("kiln-packer-bench-");
    let tmp = match std::env::var_os("KILN_BENCH_DIR") {
        Some(d) => std::fs::create_dir_all(&d)
            .map_err(|e| format!("KILN_BENCH_DIR {}: {e}", Path::new(&d).display()))
            .and_then(|()| b.tempdir_in(&d).map_err(|e| format!("work folder: {e}"))),
        None => b.tempdir().map_err(|e| format!("work folder: {e}")),
    }?;
    let work = if std::env::var_os("KILN_BENCH_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    eprintln!("packer bench: work folder {}", work.display());
    let manifest_src = fixtures().join("module.yaml");
    // The module is named after the manifest's file name.
    let manifest = work.join(format!("{MODULE}.yaml"));
    std::fs::copy(&manifest_src, &manifest)
        .map_err(|e| format!("{}: {e}", manifest_src.display()))?;

    let load_start = loadavg();

    // (a) kiln. If the base was not cached yet, that run bootstrapped it (mmdebstrap); it is
    // not counted, and kiln builds again from the now cached base.
    let mut kiln_time = None;
    let mut modules = PathBuf::new();
    for attempt in 1..=2 {
        modules = work.join(format!("kiln-{attempt}"));
        let d = timed(
            "kiln build",
            Command::new(&tools.kiln)
                .arg("build")
                .arg(&manifest)
                .arg("--output")
                .arg(&modules)
                .arg("--engine")
                .arg("qemu")
                // Packer runs every step: so does kiln here (the step cache has its own bench).
                .arg("--no-cache")
                .current_dir(&work),
            &work.join(format!("kiln-{attempt}.log")),
        )?;
        let events = modules.join(MODULE).join("logs/events.jsonl");
        if base_was_cached(&events)? {
            kiln_time = Some(d);
            break;
        }
        eprintln!(
            "packer bench: the base was not cached, so that kiln build ({:.1} s) included the \
             bootstrap; it is not counted, building again from the cached base",
            d.as_secs_f64()
        );
    }
    let kiln_time = kiln_time.ok_or("kiln bootstrapped its base twice: the cache is not kept")?;
    let kiln_disk = modules.join(MODULE).join(format!("disks/{VM}-root.qcow2"));

    // The very base kiln used, from its module record.
    let key = base_key(&modules.join(MODULE).join("module.yaml"))?;
    let entry = kiln_cache()?.join("bootstrap").join(&key);
    let meta = std::fs::read_to_string(entry.join("meta.json"))
        .map_err(|e| format!("{}: {e}", entry.display()))?;
    let root = meta_field(&meta, "rootDevice").unwrap_or_else(|| "/dev/vda".into());
    let (base, kernel, initrd) = (
        entry.join("disk.qcow2"),
        entry.join("vmlinuz"),
        entry.join("initrd.img"),
    );
    eprintln!(
        "packer bench: base {} (bootstrap key {key})",
        base.display()
    );

    // (b) Packer, on a copy of that base with root's SSH key.
    let key_file = work.join("id_ed25519");
    run_quiet(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "kiln-packer-bench",
                "-f",
            ])
            .arg(&key_file),
    )?;
    let pbase = packer_base(&base, &work, &key_file.with_extension("pub"))?;
    let cleanup = work.join("cleanup.sh");
    std::fs::write(&cleanup, kiln_cleanup_script()?).map_err(|e| e.to_string())?;
    let out_dir = work.join("packer-out");
    // kiln's kernel command line for this VM (VmLaunch::cmdline in builder/src/engine/mod.rs).
    let append = format!("root={root} rw console=ttyS0 systemd.hostname={VM} panic=-1");
    let vars = [
        ("base", pbase.display().to_string()),
        ("kernel", kernel.display().to_string()),
        ("initrd", initrd.display().to_string()),
        ("append", append),
        ("ssh_key", key_file.display().to_string()),
        ("output", out_dir.display().to_string()),
        ("motd", fixtures().join("motd").display().to_string()),
        ("cleanup", cleanup.display().to_string()),
        // The guest console to a file, as kiln does (not QEMU's default, a VNC text console).
        (
            "serial",
            work.join("packer-serial.log").display().to_string(),
        ),
    ];
    let mut packer = Command::new("packer");
    packer.arg("build").arg("-color=false").arg("-timestamp-ui");
    for (k, v) in &vars {
        packer.arg("-var").arg(format!("{k}={v}"));
    }
    packer
        .arg(fixtures().join("template.json"))
        .current_dir(&work)
        // No version check against the vendor's servers; downloads (the local base) stay here.
        .env("CHECKPOINT_DISABLE", "1")
        .env("PACKER_CACHE_DIR", work.join("packer_cache"))
        .env("PACKER_LOG", "1")
        .env("PACKER_LOG_PATH", work.join("packer-debug.log"));
    let packer_time = timed("packer build", &mut packer, &work.join("packer.log"))?;
    let packer_disk = out_dir.join("bench.qcow2");
    let load_end = loadavg();

    let kiln_size = verify_output("kiln", &kiln_disk, &work)?;
    let packer_size = verify_output("packer", &packer_disk, &work)?;

    let (k, p) = (kiln_time.as_secs_f64(), packer_time.as_secs_f64());
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n== kiln vs {} (QEMU builder), one run ==",
        tools.packer_version
    );
    let _ = writeln!(
        r,
        "module   : tests/benches/packer/module.yaml (hello.yaml's steps), 1 vCPU, 1 GiB, TCG"
    );
    let _ = writeln!(r, "base     : {}", base.display());
    let _ = writeln!(
        r,
        "kiln     : {k:8.1} s  ({} bytes, {})",
        kiln_size,
        kiln_disk.display()
    );
    let _ = writeln!(
        r,
        "packer   : {p:8.1} s  ({} bytes, {})",
        packer_size,
        packer_disk.display()
    );
    let _ = writeln!(
        r,
        "kiln     : {}",
        kiln_phases(&modules.join(MODULE).join("logs/events.jsonl"))
    );
    let _ = writeln!(
        r,
        "packer   : {}",
        packer_phases(&work.join("packer.log"), p)
    );
    let _ = writeln!(
        r,
        "ratio    : kiln/packer = {:.3} (target <= 0.50: {})",
        k / p,
        if k / p <= 0.5 { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        r,
        "load avg : {load_start} at start, {load_end} at end (1/5/15 min, {} CPUs)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    print!("{r}");
    Ok(())
}
