//! `kiln disk ...`: the block layer's operations from the command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kiln_disk::{
    BackingPolicy, Compression, ConvertOptions, CreateOptions, ExtentKind, Format, OpenOptions,
};

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty image, or a qcow2 overlay on a backing image.
    Create(CreateArgs),
    /// Show format, sizes and backing chain of an image.
    Info {
        file: PathBuf,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        allow: AllowBacking,
    },
    /// Convert between raw and qcow2, optionally compressed; flattens backing chains.
    Convert(ConvertArgs),
    /// Check qcow2 metadata: refcounts, leaks, out-of-range offsets, overlaps.
    /// Exit code as qemu-img check: 0 clean, 1 check not completed, 2 corruption,
    /// 3 leaks only, 63 the format has no checks (raw).
    Check {
        file: PathBuf,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show where each guest range is stored along the backing chain.
    Map {
        file: PathBuf,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        allow: AllowBacking,
    },
    /// Grow an image: SIZE is the new virtual size, or `+SIZE` relative to the current one
    /// (as qemu-img resize). Shrinking (`-SIZE`, or a smaller size) is refused.
    Resize {
        file: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

/// `--output human|json` (qemu-img's JSON field names); `--json` is kept as a short form.
#[derive(Debug, Args)]
pub struct OutputArg {
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[arg(long, hide = true)]
    json: bool,
}

impl OutputArg {
    fn json(&self) -> bool {
        self.json || matches!(self.output, OutputFormat::Json)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

/// Backing files are host paths written inside the image, so an image from elsewhere could
/// name any file; kiln follows one only when named here.
#[derive(Debug, Args)]
pub struct AllowBacking {
    /// Allow the image (chain) to read this backing file; repeat for each layer of a chain.
    /// Without it, an image that names a backing file is refused.
    #[arg(long = "allow-backing", value_name = "FILE")]
    allow_backing: Vec<PathBuf>,
}

impl AllowBacking {
    fn policy(&self) -> anyhow::Result<BackingPolicy> {
        if self.allow_backing.is_empty() {
            return Ok(BackingPolicy::Refuse);
        }
        BackingPolicy::only(&self.allow_backing).context("--allow-backing")
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressArg {
    Deflate,
    Zstd,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    file: PathBuf,
    /// Virtual size (see SIZES in `kiln disk --help`); defaults to the backing image's size.
    size: Option<String>,
    #[arg(short = 'f', long, value_enum, default_value = "qcow2")]
    format: FormatArg,
    /// Cluster size (512 to 2M).
    #[arg(long, default_value = "64K")]
    cluster_size: String,
    /// Backing image: absolute, or relative to the new image's directory.
    #[arg(short = 'b', long)]
    backing: Option<String>,
    /// Backing format (probed when absent).
    #[arg(short = 'F', long, value_enum)]
    backing_format: Option<FormatArg>,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    src: PathBuf,
    dst: PathBuf,
    /// Output format.
    #[arg(short = 'O', long, value_enum, default_value = "qcow2")]
    format: FormatArg,
    /// Compress clusters (qcow2 only): `-c` alone means deflate, `--compress=zstd` zstd.
    #[arg(
        short = 'c',
        long,
        value_enum,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "deflate"
    )]
    compress: Option<CompressArg>,
    /// Compression level (deflate 1-9, zstd 1-22).
    #[arg(long)]
    level: Option<i32>,
    #[arg(long, default_value = "64K")]
    cluster_size: String,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress line (there is none either when stderr is not a terminal).
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    allow: AllowBacking,
}

/// Parse a size as qemu-img does: plain bytes, or a binary suffix (`K`, `M`, `G`, `T`,
/// `P`, `E`, case-insensitive: `G` is 2^30 bytes, as in qemu-img), also spelt `Gi` or `GiB`,
/// and `B` for bytes. `GB` and the like are refused rather than guessed.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (num, unit) = t.split_at(digits);
    anyhow::ensure!(
        !num.is_empty(),
        "invalid size {s:?}: expected bytes or a number with a unit such as 64K, 512M, 20G"
    );
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        u => {
            let (letter, rest) = u.split_at(1);
            let shift = match letter {
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                "P" => 50,
                "E" => 60,
                _ => anyhow::bail!(
                    "invalid size {s:?}: unknown unit {unit:?} (K, M, G, T, P, E; binary, as in qemu-img)"
                ),
            };
            match rest {
                "" | "I" | "IB" => shift,
                "B" => anyhow::bail!(
                    "invalid size {s:?}: {unit:?} is ambiguous; sizes are binary as in qemu-img: \
                     write {num}{letter}, {num}{letter}i or {num}{letter}iB ({num} x 2^{shift} bytes)"
                ),
                _ => anyhow::bail!(
                    "invalid size {s:?}: unknown unit {unit:?} (K, M, G, T, P, E; binary, as in qemu-img)"
                ),
            }
        }
    };
    let n: u64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

/// The new size of `resize`: absolute, or `+SIZE` / `-SIZE` relative to `current`.
fn resize_target(arg: &str, current: u64) -> anyhow::Result<u64> {
    let arg = arg.trim();
    if let Some(rest) = arg.strip_prefix('+') {
        current
            .checked_add(parse_size(rest)?)
            .with_context(|| format!("size {current} {arg} is too large"))
    } else if let Some(rest) = arg.strip_prefix('-') {
        let by = parse_size(rest)?;
        current
            .checked_sub(by)
            .with_context(|| format!("cannot shrink by {arg}: the image is only {current} bytes"))
    } else {
        parse_size(arg)
    }
}

/// `1.5 GiB (1610612736 bytes)` as qemu-img prints sizes.
fn human(n: u64) -> String {
    match crate::cache::human_size(n) {
        short if n < 1024 => short,
        short => format!("{short} ({n} bytes)"),
    }
}

pub fn run(c: DiskCommand) -> anyhow::Result<ExitCode> {
    match c {
        DiskCommand::Create(a) => {
            let opts = CreateOptions {
                format: a.format.into(),
                size: a.size.as_deref().map(parse_size).transpose()?,
                cluster_size: parse_size(&a.cluster_size)?,
                backing: a.backing,
                backing_format: a.backing_format.map(Into::into),
            };
            kiln_disk::create(&a.file, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Info {
            file,
            output,
            allow,
        } => {
            let info = kiln_disk::info(&file, &allow.policy()?)?;
            if output.json() {
                let v = json::info(&file, &info.top);
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_info(&info);
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Convert(a) => {
            let compress = match (a.compress, a.level) {
                (None, _) => None,
                (Some(CompressArg::Deflate), l) => Some(Compression::Deflate {
                    level: l.map_or(2, |l| l.clamp(0, 9) as u32),
                }),
                (Some(CompressArg::Zstd), l) => Some(Compression::Zstd {
                    level: l.unwrap_or(3),
                }),
            };
            let opts = OpenOptions::read_only().with_backing(a.allow.policy()?);
            let src = kiln_disk::open(&a.src, opts)?;
            // Temporaries of killed converts into the same folder.
            let dst_dir = a
                .dst
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            crate::leftovers::sweep_and_report(&[(
                dst_dir,
                crate::leftovers::Place::ConvertOutput,
            )]);
            // A progress line is for a person watching a terminal, not for a log file.
            let show = !a.quiet && std::io::stderr().is_terminal();
            let progress: Option<Arc<kiln_disk::ProgressFn>> = show.then(|| {
                let f: Arc<kiln_disk::ProgressFn> = Arc::new(|done, total| {
                    let pct = if total == 0 {
                        100.0
                    } else {
                        done as f64 * 100.0 / total as f64
                    };
                    eprint!("\r    ({pct:.2}/100%)");
                });
                f
            });
            let opts = ConvertOptions {
                format: a.format.into(),
                compress,
                cluster_size: parse_size(&a.cluster_size)?,
                threads: a.threads,
                progress,
                sync: true,
            };
            let stats = kiln_disk::convert(src.as_ref(), &a.dst, &opts)
                .with_context(|| format!("converting {} to {}", a.src.display(), a.dst.display()));
            if show {
                eprintln!();
            }
            tracing::info!(stats = ?stats?, "converted");
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Check { file, output } => Ok(check(&file, output.json())),
        DiskCommand::Map {
            file,
            output,
            allow,
        } => {
            let policy = allow.policy()?;
            let m = kiln_disk::map(&file, &policy)?;
            if output.json() {
                let layers = kiln_disk::info(&file, &policy)?.chain.len();
                println!("{}", json::map(&m, layers));
                return Ok(ExitCode::SUCCESS);
            }
            print_map(m);
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Resize { file, size } => {
            let current = kiln_disk::virtual_size(&file)?;
            let target = resize_target(&size, current)?;
            kiln_disk::resize(&file, target)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `check` with qemu-img's exit codes: 0 clean, 1 the check could not complete, 2
/// corruption, 3 leaks only, 63 a format without checks (raw).
fn check(file: &Path, as_json: bool) -> ExitCode {
    match kiln_disk::detect_format(file) {
        Ok(Format::Qcow2) => {}
        Ok(Format::Raw) => {
            eprintln!(
                "error: {}: this image format (raw) does not support checks",
                file.display()
            );
            return ExitCode::from(63);
        }
        Err(e) => {
            eprintln!("error: check not completed: {e}");
            return ExitCode::from(1);
        }
    }
    let r = match kiln_disk::check(file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: check not completed: {e}");
            return ExitCode::from(1);
        }
    };
    if as_json {
        match serde_json::to_string_pretty(&json::check(file, &r)) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print_check(&r);
    }
    if r.corruptions > 0 {
        ExitCode::from(2)
    } else if r.leaks > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_info(info: &kiln_disk::ImageInfo) {
    for (i, l) in info.chain.iter().enumerate() {
        if i > 0 {
            println!();
            println!("backing image {i}:");
        }
        println!("image: {}", l.path.display());
        println!("file format: {}", l.format.name());
        println!("virtual size: {}", human(l.virtual_size));
        println!("disk size: {}", human(l.allocated_bytes));
        if let Some(cs) = l.cluster_size {
            println!("cluster_size: {cs}");
        }
        if let Some(v) = l.qcow2_version {
            println!("compat: {}", if v == 2 { "0.10" } else { "1.1" });
        }
        if let Some(ct) = l.compression_type {
            println!("compression type: {ct:?}");
        }
        if let Some(n) = l.snapshots.filter(|&n| n > 0) {
            println!("internal snapshots: {n}");
        }
        if let Some(b) = &l.backing_file {
            println!("backing file: {b}");
        }
        if let Some(b) = &l.backing_format {
            println!("backing file format: {b}");
        }
    }
}

fn print_check(r: &kiln_disk::CheckReport) {
    for m in &r.messages {
        println!("{m}");
    }
    if r.corruptions > 0 {
        println!("\n{} errors were found on the image.", r.corruptions);
    }
    if r.leaks > 0 {
        println!("\n{} leaked clusters were found on the image.", r.leaks);
    }
    if r.is_clean() {
        println!("No errors were found on the image.");
    }
    println!(
        "{}/{} = {:.2}% allocated\nImage end offset: {}",
        r.allocated_clusters,
        r.total_clusters,
        if r.total_clusters == 0 {
            0.0
        } else {
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
        },
        r.image_end_offset
    );
}

fn print_map(m: Vec<kiln_disk::Extent>) {
    println!(
        "{:<20}{:<20}{:<12}{:<7}{:<20}File",
        "Offset", "Length", "Kind", "Depth", "Mapped to"
    );
    for e in m {
        let kind = match e.kind {
            ExtentKind::Data => "data",
            ExtentKind::Compressed => "compressed",
            ExtentKind::Zero => "zero",
        };
        println!(
            "{:<#20x}{:<#20x}{:<12}{:<7}{:<20}{}",
            e.start,
            e.length,
            kind,
            e.depth.map_or("-".into(), |d| d.to_string()),
            e.offset.map_or("-".into(), |o| format!("{o:#x}")),
            e.file.map_or(String::new(), |f| f.display().to_string())
        );
    }
}

/// JSON in `qemu-img ... --output json`'s shapes and field names, so scripts written for
/// qemu-img read kiln's.
mod json {
    use std::path::Path;

    use kiln_disk::{CheckReport, Extent, ExtentKind, Format, LayerInfo};
    use serde_json::{json, Map, Value};

    /// `qemu-img info --output json` of the top image (`filename` as given, like qemu-img).
    pub fn info(file: &Path, l: &LayerInfo) -> Value {
        let mut o = Map::new();
        o.insert("virtual-size".into(), json!(l.virtual_size));
        o.insert("filename".into(), json!(file.display().to_string()));
        o.insert("format".into(), json!(l.format.name()));
        o.insert("actual-size".into(), json!(l.allocated_bytes));
        o.insert("dirty-flag".into(), json!(l.dirty));
        if let Some(cs) = l.cluster_size {
            o.insert("cluster-size".into(), json!(cs));
        }
        if l.format == Format::Qcow2 {
            let mut d = Map::new();
            let v3 = l.qcow2_version.is_some_and(|v| v >= 3);
            d.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
            d.insert(
                "compression-type".into(),
                json!(match l.compression_type {
                    Some(kiln_disk::qcow2::header::CompressionType::Zstd) => "zstd",
                    _ => "zlib",
                }),
            );
            if let Some(bits) = l.refcount_bits {
                d.insert("refcount-bits".into(), json!(bits));
            }
            if v3 {
                d.insert("lazy-refcounts".into(), json!(l.lazy_refcounts));
                d.insert("corrupt".into(), json!(l.corrupt));
                d.insert("extended-l2".into(), json!(false));
            }
            o.insert(
                "format-specific".into(),
                json!({ "type": "qcow2", "data": Value::Object(d) }),
            );
        }
        if let Some(b) = &l.backing_file {
            o.insert("backing-filename".into(), json!(b));
            o.insert(
                "full-backing-filename".into(),
                json!(kiln_disk::resolve_backing(file, b).display().to_string()),
            );
        }
        if let Some(f) = &l.backing_format {
            o.insert("backing-filename-format".into(), json!(f));
        }
        Value::Object(o)
    }

    /// `qemu-img check --output json` (counts that are zero are left out, as qemu-img does).
    pub fn check(file: &Path, r: &CheckReport) -> Value {
        let mut o = Map::new();
        o.insert("filename".into(), json!(file.display().to_string()));
        o.insert("format".into(), json!("qcow2"));
        o.insert("check-errors".into(), json!(0));
        for (key, n) in [
            ("image-end-offset", r.image_end_offset),
            ("total-clusters", r.total_clusters),
            ("allocated-clusters", r.allocated_clusters),
            ("fragmented-clusters", r.fragmented_clusters),
            ("compressed-clusters", r.compressed_clusters),
            ("corruptions", r.corruptions),
            ("leaks", r.leaks),
        ] {
            if n != 0 {
                o.insert(key.into(), json!(n));
            }
        }
        Value::Object(o)
    }

    /// `qemu-img map --output json`: one object per line in an array. `layers` is the
    /// chain's length: a range no layer holds is reported at the bottom layer's depth.
    pub fn map(m: &[Extent], layers: usize) -> String {
        let lines: Vec<String> = m
            .iter()
            .map(|e| {
                let mut o = Map::new();
                o.insert("start".into(), json!(e.start));
                o.insert("length".into(), json!(e.length));
                o.insert(
                    "depth".into(),
                    json!(e.depth.unwrap_or(layers.saturating_sub(1))),
                );
                o.insert("present".into(), json!(e.depth.is_some()));
                o.insert("zero".into(), json!(e.kind == ExtentKind::Zero));
                o.insert("data".into(), json!(e.kind != ExtentKind::Zero));
                if let Some(off) = e.offset {
                    o.insert("offset".into(), json!(off));
                }
                Value::Object(o).to_string()
            })
            .collect();
        format!("[{}]", lines.join(",\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_size, resize_target};

    #[test]
    fn sizes_parse_as_qemu_img() {
        for (arg, want) in [
            ("512", 512u64),
            ("512B", 512),
            ("64K", 65536),
            ("64k", 65536),
            ("64KiB", 65536),
            ("2G", 2 << 30),
            ("20Gi", 20 << 30),
            ("20GiB", 20 << 30),
            ("20gib", 20 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
        ] {
            assert_eq!(parse_size(arg).unwrap(), want, "{arg}");
        }
        for bad in [
            "1X",
            "GB",
            "",
            "1.5G",
            "20GB",
            "20MB",
            "1Gx",
            "-1",
            "99999999999T",
            "16E",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("20GB")
            .unwrap_err()
            .to_string()
            .contains("20GiB"));
    }

    #[test]
    fn resize_sizes_are_relative_with_a_sign() {
        assert_eq!(resize_target("+10M", 4 << 20).unwrap(), 14 << 20);
        assert_eq!(resize_target("-1M", 4 << 20).unwrap(), 3 << 20);
        assert_eq!(resize_target("10M", 4 << 20).unwrap(), 10 << 20);
        assert!(resize_target("-5M", 4 << 20).is_err());
        assert!(resize_target("+16E", 1).is_err());
    }
}
