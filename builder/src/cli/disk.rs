//! `kiln disk ...`: the block layer's operations from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kiln_disk::{Compression, ConvertOptions, CreateOptions, ExtentKind, Format, OpenOptions};

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty image, or a qcow2 overlay on a backing image.
    Create(CreateArgs),
    /// Show format, sizes and backing chain of an image.
    Info {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert between raw and qcow2, optionally compressed; flattens backing chains.
    Convert(ConvertArgs),
    /// Check qcow2 metadata: refcounts, leaks, out-of-range offsets, overlaps.
    /// Exit code 0: clean, 2: corruption, 3: leaks only (as qemu-img check).
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show where each guest range is stored along the backing chain.
    Map {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Grow an image to a new virtual size.
    Resize { file: PathBuf, size: String },
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
    /// Virtual size (bytes, or with K/M/G/T suffix); defaults to the backing image's size.
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
    /// No progress line.
    #[arg(short, long)]
    quiet: bool,
}

/// Parse "10G", "512M", "64K", "1048576".
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => anyhow::bail!("unknown size suffix in {s:?} (K, M, G, T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(mul)
        .with_context(|| format!("size {s:?} is too large"))
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", U[i])
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
        DiskCommand::Info { file, json } => {
            let info = kiln_disk::info(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(ExitCode::SUCCESS);
            }
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
            let src = kiln_disk::open(&a.src, OpenOptions::read_only())?;
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
            let quiet = a.quiet;
            let progress: Option<Arc<kiln_disk::ProgressFn>> = (!quiet).then(|| {
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
            let stats = kiln_disk::convert(src.as_ref(), &a.dst, &opts).with_context(|| {
                format!("converting {} to {}", a.src.display(), a.dst.display())
            })?;
            if !quiet {
                eprintln!();
            }
            tracing::info!(?stats, "converted");
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Check { file, json } => {
            let r = kiln_disk::check(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
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
            Ok(if r.corruptions > 0 {
                ExitCode::from(2)
            } else if r.leaks > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        DiskCommand::Map { file, json } => {
            let m = kiln_disk::map(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
                return Ok(ExitCode::SUCCESS);
            }
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
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Resize { file, size } => {
            let size = parse_size(&size)?;
            kiln_disk::resize(&file, size)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
