//! Build logs: the event log, each VM's step output and serial console, created through
//! [`crate::log_file`] (0600: they may hold secrets).
//!
//! A successful build files them in its module's `logs/`. A failed or cancelled build keeps
//! them in `<output>/.logs/<build-id>/` (the build id is `<module>-<UTC date>-<time>`), next
//! to the modules, so they move with the output folder; `kiln logs` finds both.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The folder of an output that holds failed builds' logs.
pub const FAILED_DIR: &str = ".logs";
/// The event log's name in a logs folder.
pub const EVENTS_FILE: &str = "events.jsonl";
/// A build id: `<module>-<YYYYMMDD>-<HHMMSS>` (UTC) of `at`.
pub fn build_id(module: &str, at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = crate::events::civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{module}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Where a failed build of `module` in `output` keeps its logs: a fresh
/// `<output>/.logs/<build-id>/` name (not made yet).
pub fn failed_dir(output: &Path, module: &str) -> PathBuf {
    let base = output.join(FAILED_DIR);
    let id = build_id(module, SystemTime::now());
    let mut p = base.join(&id);
    let mut n = 2;
    while p.exists() {
        p = base.join(format!("{id}-{n}"));
        n += 1;
    }
    p
}

/// Makes `dir`'s parent `.logs` (0700) and `dir`, for a failed build's logs.
pub fn make_failed_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)
}

/// Moves a failed attempt's logs folder to `to`, replacing an earlier attempt's.
pub fn keep(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() {
        // An earlier attempt of a retried build: the last attempt's logs are kept, the
        // event log (kept separately) tells every attempt.
        for e in std::fs::read_dir(to)?.flatten() {
            if e.file_name() != EVENTS_FILE {
                let _ = std::fs::remove_file(e.path());
            }
        }
    } else {
        make_failed_dir(to)?;
    }
    for e in std::fs::read_dir(from)?.flatten() {
        std::fs::rename(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// One build whose logs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptBuild {
    /// The build id (a failed build) or the module's name (its successful build).
    pub id: String,
    pub module: String,
    pub failed: bool,
    pub dir: PathBuf,
    pub when: Option<SystemTime>,
}

/// Every build of `output` with logs: failed builds in `.logs/`, and built modules, oldest
/// first.
pub fn list(output: &Path) -> Vec<KeptBuild> {
    let mut out = Vec::new();
    let when = |dir: &Path| {
        std::fs::metadata(dir.join(EVENTS_FILE))
            .or_else(|_| std::fs::metadata(dir))
            .and_then(|m| m.modified())
            .ok()
    };
    if let Ok(rd) = std::fs::read_dir(output.join(FAILED_DIR)) {
        for e in rd.flatten() {
            let dir = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(id) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            out.push(KeptBuild {
                module: module_of(&id).to_string(),
                failed: true,
                when: when(&dir),
                dir,
                id,
            });
        }
    }
    if let Ok(modules) = crate::module::list(output) {
        for (dir, rec) in modules {
            let logs = dir.join("logs");
            if logs.is_dir() {
                out.push(KeptBuild {
                    id: rec.name.clone(),
                    module: rec.name,
                    failed: false,
                    when: when(&logs),
                    dir: logs,
                });
            }
        }
    }
    out.sort_by(|a, b| a.when.cmp(&b.when).then_with(|| a.id.cmp(&b.id)));
    out
}

/// The module name in a build id (`<module>-<date>-<time>[-<n>]`).
fn module_of(id: &str) -> &str {
    let digits = |s: &str, len: Option<usize>| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && len.is_none_or(|l| s.len() == l)
    };
    fn stamped<'a>(s: &'a str, digits: &dyn Fn(&str, Option<usize>) -> bool) -> Option<&'a str> {
        let (h, t) = s.rsplit_once('-')?;
        let (m, d) = h.rsplit_once('-')?;
        (digits(d, Some(8)) && digits(t, Some(6))).then_some(m)
    }
    stamped(id, &digits)
        .or_else(|| {
            let (h, n) = id.rsplit_once('-')?;
            digits(n, None).then(|| stamped(h, &digits)).flatten()
        })
        .unwrap_or(id)
}

/// The build `what` names: a build id, or a module's name for its latest build.
pub fn find(output: &Path, what: &str) -> Option<KeptBuild> {
    let all = list(output);
    if let Some(b) = all.iter().find(|b| b.failed && b.id == what) {
        return Some(b.clone());
    }
    all.into_iter().rev().find(|b| b.module == what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    #[test]
    fn build_ids_carry_the_module_and_utc_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_625_111);
        assert_eq!(build_id("web", t), "web-20261207-063151");
        assert_eq!(
            build_id("a-b", SystemTime::UNIX_EPOCH),
            "a-b-19700101-000000"
        );
        assert_eq!(module_of("a-b-19700101-000000"), "a-b");
        assert_eq!(module_of("a-b-19700101-000000-2"), "a-b");
        assert_eq!(module_of("web-20261207-063151"), "web");
    }

    #[test]
    fn failed_and_built_are_listed_and_found() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path();
        let d1 = failed_dir(out, "web");
        make_failed_dir(&d1).unwrap();
        std::fs::write(d1.join(EVENTS_FILE), "{}\n").unwrap();
        let d2 = failed_dir(out, "web");
        assert_ne!(d1, d2);
        assert!(d2.file_name().unwrap().to_str().unwrap().ends_with("-2"));
        assert_eq!(
            std::fs::metadata(out.join(FAILED_DIR)).unwrap().mode() & 0o777,
            0o700
        );
        let all = list(out);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].module, "web");
        let id = all[0].id.clone();
        assert_eq!(find(out, &id).unwrap().dir, d1);
        assert_eq!(find(out, "web").unwrap().dir, d1);
        assert!(find(out, "db").is_none());
    }

    #[test]
    fn keep_moves_an_attempts_logs_and_replaces_an_earlier_attempts() {
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("partial/logs");
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("box.log"), "second").unwrap();
        let to = t.path().join(".logs/web-1");
        make_failed_dir(&to).unwrap();
        std::fs::write(to.join("box.log"), "first").unwrap();
        std::fs::write(to.join("old-serial.log"), "first").unwrap();
        std::fs::write(to.join(EVENTS_FILE), "{}").unwrap();
        keep(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("box.log")).unwrap(),
            "second"
        );
        assert!(!to.join("old-serial.log").exists());
        assert!(to.join(EVENTS_FILE).exists());
    }
}
