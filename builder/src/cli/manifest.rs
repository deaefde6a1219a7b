//! `kiln validate`, `kiln fmt`, `kiln plan`, `kiln schema`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::manifest::{self, fmt, json_schema, units, Diagnostic, Loaded, Plan};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Manifest files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FmtArgs {
    /// Manifests to format: files, folders (their `*.yaml` and `*.yml` files, subfolders
    /// included, hidden ones and symbolic links skipped) or `-` for standard input (the
    /// result goes to standard output).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Change nothing; exit 1 and name the files that are not canonical.
    #[arg(long)]
    pub check: bool,
    /// Change nothing; print a unified diff of what formatting would change (exit 1 if any).
    #[arg(long, conflicts_with = "stdout")]
    pub diff: bool,
    /// Print the canonical text instead of rewriting the files.
    #[arg(long, conflicts_with = "check")]
    pub stdout: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {}

/// Exit codes of `kiln validate`: 0 valid, 1 invalid, 2 unreadable.
const INVALID: u8 = 1;
const UNREADABLE: u8 = 2;

/// The report `kiln validate` prints for one manifest (also used by the golden tests).
pub fn validate_report(l: &Loaded) -> String {
    let mut out: String = l.diagnostics.iter().map(Diagnostic::render).collect();
    let errors = l.errors().count();
    let warnings = l.warnings().count();
    let file = l.path.display();
    match &l.plan {
        Some(p) => {
            let vms = p.base.vms.len();
            out.push_str(&format!(
                "{file}: valid: module `{}`, {vms} VM{}{}\n",
                p.module,
                if vms == 1 { "" } else { "s" },
                plural(warnings, "warning", ", ")
            ));
        }
        None => out.push_str(&format!(
            "{file}: invalid: {errors} error{}{}\n",
            if errors == 1 { "" } else { "s" },
            plural(warnings, "warning", ", ")
        )),
    }
    out
}

fn plural(n: usize, what: &str, sep: &str) -> String {
    match n {
        0 => String::new(),
        1 => format!("{sep}1 {what}"),
        n => format!("{sep}{n} {what}s"),
    }
}

pub fn validate(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut code = 0u8;
    let mut json_out = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for f in &a.files {
        match manifest::load(f) {
            Ok(l) => {
                if l.has_errors() {
                    code = code.max(INVALID);
                }
                if a.json {
                    json_out.push(serde_json::json!({
                        "file": f.display().to_string(),
                        "valid": !l.has_errors(),
                        "module": l.plan.as_ref().map(|p| p.module.clone()),
                        "diagnostics": l.diagnostics,
                    }));
                } else {
                    out.write_all(validate_report(&l).as_bytes())?;
                }
            }
            Err(e) => {
                code = UNREADABLE;
                if a.json {
                    json_out.push(serde_json::json!({
                        "file": f.display().to_string(),
                        "valid": false,
                        "unreadable": e.to_string(),
                        "diagnostics": [],
                    }));
                } else {
                    writeln!(out, "{}: error: {e}", f.display())?;
                }
            }
        }
    }
    if a.json {
        serde_json::to_writer_pretty(&mut out, &json_out)?;
        writeln!(out)?;
    }
    Ok(ExitCode::from(code))
}

/// What `kiln fmt` was asked to format: a file, or standard input.
enum FmtInput {
    File(PathBuf),
    Stdin,
}

impl FmtInput {
    fn name(&self) -> String {
        match self {
            FmtInput::File(p) => p.display().to_string(),
            FmtInput::Stdin => "<stdin>".into(),
        }
    }
}

pub fn fmt(a: FmtArgs) -> anyhow::Result<ExitCode> {
    let mut code = 0u8;
    let mut inputs = Vec::new();
    for f in &a.files {
        if f.as_os_str() == "-" {
            if inputs.iter().any(|i| matches!(i, FmtInput::Stdin)) {
                anyhow::bail!("`-` (standard input) given twice");
            }
            inputs.push(FmtInput::Stdin);
        } else if f.is_dir() {
            let mut found = Vec::new();
            manifests_in(f, &mut found).with_context(|| format!("listing {}", f.display()))?;
            if found.is_empty() {
                eprintln!(
                    "{}: error: no *.yaml or *.yml files in this folder",
                    f.display()
                );
                code = code.max(UNREADABLE);
            }
            inputs.extend(found.into_iter().map(FmtInput::File));
        } else {
            inputs.push(FmtInput::File(f.clone()));
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for input in &inputs {
        let (text, loaded) = match read_for_fmt(input) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{}: error: {e:#}", input.name());
                code = code.max(UNREADABLE);
                continue;
            }
        };
        if loaded.has_errors() {
            eprint!("{}", validate_report(&loaded));
            eprintln!(
                "{}: kiln fmt formats valid manifests only: fix the errors above first",
                input.name()
            );
            code = code.max(INVALID);
            continue;
        }
        let tree = match manifest::yaml::parse(&text, manifest::Limits::default().yaml) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: error: {}", input.name(), e.message);
                code = code.max(UNREADABLE);
                continue;
            }
        };
        let formatted = fmt::format(&tree, &text);
        let changed = formatted != text;
        if a.diff {
            if changed {
                let name = input.name();
                let diff = similar::TextDiff::from_lines(&text, &formatted);
                write!(
                    out,
                    "{}",
                    diff.unified_diff()
                        .header(&name, &format!("{name} (formatted)"))
                )?;
                code = code.max(INVALID);
            }
            if !a.check {
                continue;
            }
        }
        if a.check {
            if changed {
                eprintln!("{}: not in canonical form", input.name());
                code = code.max(INVALID);
            }
            continue;
        }
        match input {
            FmtInput::Stdin => out.write_all(formatted.as_bytes())?,
            FmtInput::File(_) if a.stdout => out.write_all(formatted.as_bytes())?,
            FmtInput::File(path) => {
                if changed {
                    write_atomic(path, formatted.as_bytes())?;
                    eprintln!("{}: formatted", path.display());
                }
            }
        }
    }
    if a.check && code == INVALID && inputs.iter().any(|i| matches!(i, FmtInput::File(_))) {
        eprintln!(
            "run `kiln fmt` on them (comments are kept), or `kiln fmt --diff` to see the changes"
        );
    }
    Ok(ExitCode::from(code))
}

/// The text of a manifest and its validation. Standard input is bounded like a file.
fn read_for_fmt(input: &FmtInput) -> anyhow::Result<(String, Loaded)> {
    match input {
        FmtInput::File(path) => {
            let loaded = manifest::load(path)?;
            if loaded.has_errors() {
                return Ok((String::new(), loaded));
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok((text, loaded))
        }
        FmtInput::Stdin => {
            use std::io::Read as _;
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .take(manifest::MAX_FILE_BYTES + 1)
                .read_to_end(&mut bytes)
                .context("reading standard input")?;
            if bytes.len() as u64 > manifest::MAX_FILE_BYTES {
                anyhow::bail!(
                    "the manifest is over the limit of {} MiB",
                    manifest::MAX_FILE_BYTES >> 20
                );
            }
            let path = std::path::Path::new("<stdin>");
            let loaded = manifest::load_bytes(&bytes, path, manifest::Limits::from_env());
            let text = String::from_utf8(bytes).unwrap_or_default();
            Ok((text, loaded))
        }
    }
}

/// The `*.yaml` and `*.yml` files under `dir`, sorted, in subfolders too. Hidden entries are
/// skipped (`.git`, editors' folders), and so are symbolic links, so a walk never leaves the
/// folder it was given nor loops.
fn manifests_in(dir: &std::path::Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let ty = e.file_type()?;
        let path = e.path();
        if ty.is_dir() {
            manifests_in(&path, found)?;
        } else if ty.is_file() && path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            found.push(path);
        }
    }
    Ok(())
}

/// Write to a temporary name in the same directory, then rename over the target, keeping its
/// mode. A symbolic link stays one: the file it points to is replaced.
fn write_atomic(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let real =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let dir = real
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    if let Ok(meta) = std::fs::metadata(&real) {
        std::fs::set_permissions(tmp.path(), meta.permissions())?;
    }
    tmp.persist(&real)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

pub fn plan(a: PlanArgs) -> anyhow::Result<ExitCode> {
    // Under `--json` a failure is a JSON error on stdout too, as `kiln build --json` ends.
    let json_error = |message: String, diagnostics: Vec<Diagnostic>| {
        if a.json {
            if let Some(line) = crate::events::json_line(&crate::events::Event::Error {
                message,
                diagnostics,
            }) {
                println!("{line}");
            }
        }
    };
    let loaded = match manifest::load(&a.file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            json_error(e.to_string(), Vec::new());
            return Ok(ExitCode::from(UNREADABLE));
        }
    };
    for d in loaded.warnings() {
        eprint!("{}", d.render());
    }
    let Some(plan) = &loaded.plan else {
        eprint!("{}", validate_report(&loaded));
        json_error(
            format!("manifest {} is invalid", a.file.display()),
            loaded.errors().cloned().collect(),
        );
        return Ok(ExitCode::from(INVALID));
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(plan)?);
    } else {
        print!("{}", human_plan(plan));
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan for people: one block per VM, the network, and what the overrides change.
pub fn human_plan(p: &Plan) -> String {
    use crate::manifest::{BootEvent, FileContent, ScriptSource, Source, Step};
    let mut s = String::new();
    let d = units::format_duration;
    s.push_str(&format!(
        "module {}: timeout {}, retries {}, ISO cache {}\n",
        p.module,
        d(p.timeout),
        p.retries,
        d(p.iso_cache_ttl)
    ));
    s.push_str("network (build):\n");
    for v in &p.build.network.vpcs {
        let base = p.base.network.vpc(&v.name).map(|b| b.internet);
        let clone_note = match base {
            Some(b) if b != v.internet => {
                format!(" (clones: internet {})", if b { "on" } else { "off" })
            }
            _ => String::new(),
        };
        s.push_str(&format!(
            "  vpc {}: internet {}{}{clone_note}\n",
            v.name,
            if v.internet { "on" } else { "off" },
            if v.host_access {
                ", host access (guests reach the host's own addresses)"
            } else {
                ""
            }
        ));
        for sub in p.build.network.subnets.iter().filter(|x| x.vpc == v.name) {
            s.push_str(&format!(
                "    subnet {} {} gateway {}{}{}{}\n",
                sub.name,
                sub.cidr,
                sub.gateway,
                if sub.dhcp && !sub.unmanaged {
                    ", dhcp"
                } else {
                    ""
                },
                if sub.unmanaged { ", unmanaged" } else { "" },
                if sub.dns.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", dns {}",
                        sub.dns
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
            ));
        }
    }
    for vm in &p.build.vms {
        let source = match &vm.source {
            Source::Url { url, sha256 } => format!(
                "url {url}{}",
                sha256
                    .as_ref()
                    .map(|h| format!(" (sha256 {})", &h[..12.min(h.len())]))
                    .unwrap_or_default()
            ),
            Source::File { path } => format!("file {}", path.display()),
            Source::Bootstrap {
                distro,
                suite,
                packages,
                mirror,
                kernel,
            } => format!(
                "bootstrap {distro} {suite}{}{}{}",
                if packages.is_empty() {
                    String::new()
                } else {
                    format!(" + {}", packages.join(" "))
                },
                kernel
                    .as_ref()
                    .map(|k| format!(" (kernel {k})"))
                    .unwrap_or_default(),
                mirror
                    .as_ref()
                    .map(|m| format!(" from {m}"))
                    .unwrap_or_default()
            ),
            Source::BuildRef { name, vm_name, .. } => format!(
                "buildRef {name}{}",
                vm_name
                    .as_ref()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default()
            ),
            Source::Blank => "blank".into(),
        };
        let base = p.base.vm(&vm.name);
        let res_note = match base {
            Some(b) if b.cpus != vm.cpus || b.memory != vm.memory => format!(
                " (clones: {} vCPU, {})",
                b.cpus,
                units::format_bytes(b.memory)
            ),
            _ => String::new(),
        };
        s.push_str(&format!(
            "vm {}{}: {} vCPU, {} memory{res_note}\n  source: {source}\n",
            vm.name,
            if vm.invisible { " (invisible)" } else { "" },
            vm.cpus,
            units::format_bytes(vm.memory)
        ));
        for disk in &vm.disks {
            s.push_str(&format!(
                "  disk {}: {} {}\n",
                disk.name,
                units::format_bytes(disk.size),
                format!("{:?}", disk.bus).to_lowercase()
            ));
        }
        for nic in &vm.nics {
            s.push_str(&format!(
                "  nic {} slot {}: subnet {} (vpc {}), {}, mac {}\n",
                nic.name,
                nic.slot,
                nic.subnet,
                nic.vpc,
                nic.ip
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "dhcp".into()),
                nic.mac
            ));
        }
        s.push_str(&format!(
            "  communicator: {}, shell {}{}\n",
            format!("{:?}", vm.communicator.kind).to_lowercase(),
            format!("{:?}", vm.communicator.shell).to_lowercase(),
            if vm.cloud_init.is_some() {
                ", cloud-init seed"
            } else {
                ""
            }
        ));
        if let Some(e) = vm.efi {
            s.push_str(&format!(
                "  firmware: UEFI{}\n",
                if e.secure_boot { " + Secure Boot" } else { "" }
            ));
        }
        if vm.boot != manifest::Boot::Auto {
            s.push_str(&format!(
                "  boot: {}\n",
                match vm.boot {
                    manifest::Boot::Direct => "direct (forced)",
                    _ => "firmware (forced)",
                }
            ));
        }
        for iso in &vm.isos {
            s.push_str(&format!("  iso: {}\n", iso.url));
        }
        if !vm.floppy_files.is_empty() {
            s.push_str(&format!("  floppy: {}\n", vm.floppy_files.join(", ")));
        }
        if !vm.boot_command.is_empty() {
            let typed: Vec<String> = vm
                .boot_command
                .iter()
                .map(|e| match e {
                    BootEvent::Text(t) => format!("{t:?}"),
                    BootEvent::Key(k) => format!("<{k:?}>"),
                    BootEvent::Modifier { key, down } => {
                        format!("<{key:?}{}>", if *down { "On" } else { "Off" })
                    }
                    BootEvent::Wait(w) => format!("<wait {}>", d(*w)),
                    BootEvent::HttpIp => "<HTTPIP>".into(),
                    BootEvent::HttpPort => "<HTTPPort>".into(),
                })
                .collect();
            s.push_str(&format!(
                "  boot command (after {}, {} a key): {}\n",
                d(vm.boot_wait),
                d(vm.boot_key_interval),
                typed.join(" ")
            ));
        }
        for (i, pr) in vm.provisioners.iter().enumerate() {
            let what = match &pr.step {
                Step::Shell { script, env, .. } => format!(
                    "shell{}{}",
                    match script {
                        ScriptSource::Inline(t) => format!(" ({} lines)", t.lines().count()),
                        ScriptSource::Path(p) => format!(" {}", p.display()),
                    },
                    if env.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", env {}",
                            env.keys().cloned().collect::<Vec<_>>().join(",")
                        )
                    }
                ),
                Step::File {
                    content,
                    destination,
                } => format!(
                    "file {} -> {destination}",
                    match content {
                        FileContent::Inline(t) => format!("({} bytes inline)", t.len()),
                        FileContent::Url(u) => u.clone(),
                        FileContent::Path(p) => p.display().to_string(),
                    }
                ),
                Step::Reboot { command } => format!("reboot ({command})"),
                Step::Handbuild { .. } => "handbuild".into(),
            };
            s.push_str(&format!(
                "  step {} {}: {what}, timeout {}\n",
                i + 1,
                pr.name,
                d(pr.step_timeout)
            ));
        }
    }
    if !p.files.is_empty() {
        s.push_str(&format!(
            "files: {}\n",
            p.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !p.http_directory.is_empty() {
        s.push_str(&format!(
            "http directory: {}\n",
            p.http_directory.join(", ")
        ));
    }
    s
}

pub fn schema(_a: SchemaArgs) -> anyhow::Result<ExitCode> {
    println!(
        "{}",
        serde_json::to_string_pretty(&json_schema::json_schema())?
    );
    Ok(ExitCode::SUCCESS)
}
