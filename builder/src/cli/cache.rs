//! `kiln cache ls` and `kiln cache prune`: what the download and bootstrap cache holds, and
//! removing what is no longer used (never while a build holds the cache).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::cache::{self, Cache, Entry, PruneWhat};

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the cache's entries: kind, key, size, last used.
    Ls(LsArgs),
    /// Remove entries (refused while a build uses the cache).
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// The modules folder: a step cache layer lists the modules there that record it.
    #[arg(long, env = "KILN_MODULES", default_value = "modules")]
    pub modules: PathBuf,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove entries not used for this long (`90s`, `12h`, `30d`, `2w`).
    #[arg(long, value_parser = parse_age, conflicts_with_all = ["all", "max_size"])]
    pub older_than: Option<Duration>,
    /// Remove the least recently used entries until the cache holds at most this much
    /// (`500M`, `20G`).
    #[arg(long, value_parser = parse_size, conflicts_with = "all")]
    pub max_size: Option<u64>,
    /// Remove everything (but the layers modules record).
    #[arg(long)]
    pub all: bool,
    /// The modules folder: the step cache layers its modules record (and the layers below
    /// them) are never removed.
    #[arg(long, env = "KILN_MODULES", default_value = "modules")]
    pub modules: PathBuf,
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(c: CacheCommand) -> anyhow::Result<ExitCode> {
    match c {
        CacheCommand::Ls(a) => ls(a),
        CacheCommand::Prune(a) => prune(a),
    }
}

/// The step cache layers each module in `modules` records, by key (a folder that is not
/// there records none).
fn recorded_layers(modules: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !modules.is_dir() {
        return Ok(by_key);
    }
    for (_, rec) in crate::module::list(modules)? {
        for l in rec.vms.iter().flat_map(|v| &v.layers) {
            let users = by_key.entry(l.key.clone()).or_default();
            if !users.contains(&rec.name) {
                users.push(rec.name.clone());
            }
        }
    }
    Ok(by_key)
}

fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let cache = Cache::from_env()?;
    let mut es = cache.entries()?;
    let used = recorded_layers(&a.modules)?;
    for e in &mut es {
        if let Some(l) = &mut e.layer {
            l.used_by = used.get(&e.key).cloned().unwrap_or_default();
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "root": cache.root(),
                "entries": es,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if es.is_empty() {
        println!("the cache {} is empty", cache.root().display());
        return Ok(ExitCode::SUCCESS);
    }
    print_entries(&es);
    let total: u64 = es.iter().map(|e| e.size).sum();
    println!(
        "{} entries, {} in {}",
        es.len(),
        crate::cache::human_size(total),
        cache.root().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let what = match (a.all, a.older_than, a.max_size) {
        (true, _, _) => PruneWhat::All,
        (false, Some(d), _) => PruneWhat::OlderThan(d),
        (false, None, Some(n)) => PruneWhat::MaxSize(n),
        (false, None, None) => {
            bail!("say what to prune: --older-than AGE, --max-size SIZE or --all")
        }
    };
    let root = Cache::root_from_env()?;
    let recorded: BTreeSet<String> = recorded_layers(&a.modules)?.into_keys().collect();
    let es = cache::prune(&root, what, &recorded, a.dry_run)?;
    if !recorded.is_empty() {
        println!(
            "kept the step cache layers that modules in {} record, and the layers below them",
            a.modules.display()
        );
    }
    if !es.is_empty() {
        print_entries(&es);
    }
    let total: u64 = es.iter().map(|e| e.size).sum();
    println!(
        "{} {} entries, {}",
        if a.dry_run { "would remove" } else { "removed" },
        es.len(),
        crate::cache::human_size(total)
    );
    Ok(ExitCode::SUCCESS)
}

fn print_entries(es: &[Entry]) {
    println!("{:<10} {:<20} {:>10}  LAST USED", "KIND", "KEY", "SIZE");
    let now = SystemTime::now();
    for e in es {
        // Digests are long: their start names them well enough here (--json has them whole).
        let key: String = e.key.chars().take(20).collect();
        let ago = now.duration_since(e.last_used).unwrap_or_default();
        let what = match &e.layer {
            Some(l) => format!(
                "  {}/{} step {} '{}'{}",
                l.module,
                l.vm,
                l.step,
                l.step_name,
                if l.used_by.is_empty() {
                    String::new()
                } else {
                    format!(", used by {}", l.used_by.join(", "))
                }
            ),
            None => String::new(),
        };
        println!(
            "{:<10} {:<20} {:>10}  {} ago{what}",
            e.kind.name(),
            key,
            crate::cache::human_size(e.size),
            age(ago)
        );
    }
}

/// `500M`, `20G`, `1T`, `4096` (bytes): binary units.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (K, M, G, T), e.g. 20G"))?;
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `90s`, `45m`, `12h`, `30d`, `2w`.
fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (s, m, h, d, w), e.g. 30d"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use s, m, h, d or w)"
            ))
        }
    };
    n.checked_mul(mul)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_age("30").is_err());
        assert!(parse_age("d").is_err());
        assert!(parse_age("99999999999999999999w").is_err());
        assert_eq!(crate::cache::human_size(512), "512 B");
        assert_eq!(crate::cache::human_size(3 << 29), "1.5 GiB");
        assert_eq!(age(Duration::from_secs(3 * 86400)), "3d");
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
