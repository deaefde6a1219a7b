//! The kvm engine's smoke test ([`kiln_vmm::smoke`]) as `kiln doctor` and `--engine auto`
//! use it: which kernel to boot, and the results cached in `<cache>/smoke/<key>.json`, one
//! per (host kernel release, kiln version, kernel file digest).
//!
//! `auto` picks kvm only where the probe says KVM runs a stock kernel AND a smoke test passed
//! on this host kernel with this kiln. Where the probe says so and no result exists yet,
//! `auto` runs the test itself once (at most [`kiln_vmm::smoke::DEFAULT_TIMEOUT`], under a
//! second on real KVM) when a kernel is at hand, and caches it; without a kernel it picks
//! qemu and says to run `kiln doctor`.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{sha256_bytes, sha256_file, Cache};

/// The sub-folder of the cache holding results; `kiln cache prune` leaves it (a few
/// hundred bytes per host kernel).
const DIR: &str = "smoke";

/// What the result of a smoke test depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmokeKey {
    /// `uname -r` of the host: KVM is part of the host kernel.
    pub host_kernel: String,
    pub kiln_version: String,
    pub kernel_sha256: String,
}

impl SmokeKey {
    /// The key of a smoke boot of `kernel` on this host with this kiln.
    pub fn for_kernel(kernel: &Path) -> std::io::Result<SmokeKey> {
        Ok(SmokeKey {
            host_kernel: host_kernel_release(),
            kiln_version: crate::version::LONG.to_string(),
            kernel_sha256: sha256_file(kernel)?,
        })
    }

    /// The result file's name (without `.json`).
    pub fn file_stem(&self) -> String {
        // Serializing three strings cannot fail.
        sha256_bytes(&serde_json::to_vec(self).unwrap_or_default())
    }
}

/// `/proc/sys/kernel/osrelease` (what `uname -r` prints), or "unknown".
pub fn host_kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// One cached smoke-test result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmokeRecord {
    pub host_kernel: String,
    pub kiln_version: String,
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub passed: bool,
    pub reason: String,
    /// RFC 3339 UTC.
    pub when: String,
    pub seconds: f64,
    #[serde(default)]
    pub console_tail: String,
}

/// What `auto` knows about the smoke test on this host.
#[derive(Debug, Clone, PartialEq)]
pub enum SmokeStatus {
    /// No result for this host kernel and kiln version; why, for the user.
    NotRun(String),
    Done(SmokeRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum SmokeCacheError {
    #[error("reading the kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the smoke-test result {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Run(#[from] kiln_vmm::smoke::SmokeError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("finding the kiln binary to run the VMM: {0}")]
    Exe(std::io::Error),
}

/// The results folder of the cache at `root`.
pub fn results_dir(root: &Path) -> PathBuf {
    root.join(DIR)
}

/// The result cached for exactly `key`, if any (an unreadable file counts as none).
pub fn read(dir: &Path, key: &SmokeKey) -> Option<SmokeRecord> {
    let text = fs::read(dir.join(format!("{}.json", key.file_stem()))).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The newest result for this host kernel and kiln version, whatever kernel it booted: any
/// stock kernel reaching userspace shows the VMM works on this host.
pub fn latest_for(dir: &Path, host_kernel: &str, kiln_version: &str) -> Option<SmokeRecord> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_slice::<SmokeRecord>(&fs::read(e.path()).ok()?).ok())
        .filter(|r| r.host_kernel == host_kernel && r.kiln_version == kiln_version)
        // RFC 3339 UTC strings of one format sort by time.
        .max_by(|a, b| a.when.cmp(&b.when))
}

/// The newest result this kiln can use on this host: the key's host kernel and kiln
/// (version and commit, as [`SmokeKey::for_kernel`] writes them). `kiln doctor` and
/// `--engine auto` both read through here, so they never disagree.
pub fn latest_here(dir: &Path) -> Option<SmokeRecord> {
    latest_for(dir, &host_kernel_release(), crate::version::LONG)
}

/// Store `record` under `key`: written to a temp name and renamed, so readers see a whole
/// file or none.
pub fn write(dir: &Path, key: &SmokeKey, record: &SmokeRecord) -> Result<PathBuf, SmokeCacheError> {
    let path = dir.join(format!("{}.json", key.file_stem()));
    let err = |source| SmokeCacheError::Write {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{}.{}.tmp", key.file_stem(), std::process::id()));
    let json = serde_json::to_vec_pretty(record).unwrap_or_default();
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            err(e)
        })?;
    Ok(path)
}

/// Where a smoke kernel came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmokeKernel {
    pub path: PathBuf,
    /// "bootstrap base <key>", "the host's /boot", or "--smoke-kernel".
    pub origin: String,
}

/// What to boot: the newest kernel among the cache's bootstrapped bases, else the host's
/// own `/boot/vmlinuz-<release>` if readable.
pub fn find_kernel(cache_root: &Path) -> Option<SmokeKernel> {
    newest_bootstrap_kernel(&cache_root.join("bootstrap")).or_else(|| {
        let p = PathBuf::from(format!("/boot/vmlinuz-{}", host_kernel_release()));
        fs::File::open(&p).ok().map(|_| SmokeKernel {
            path: p,
            origin: "the host's /boot".into(),
        })
    })
}

/// The bootstrap entry (`<key>/vmlinuz` beside `meta.json`) with the highest
/// `kernelVersion`.
fn newest_bootstrap_kernel(dir: &Path) -> Option<SmokeKernel> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        kernel_version: String,
    }
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let kernel = e.path().join("vmlinuz");
            let meta: Meta =
                serde_json::from_slice(&fs::read(e.path().join("meta.json")).ok()?).ok()?;
            kernel.is_file().then(|| {
                let key = e.file_name().to_string_lossy().into_owned();
                (version_key(&meta.kernel_version), key, kernel)
            })
        })
        .max()
        .map(|(_, key, path)| SmokeKernel {
            origin: format!(
                "bootstrap base {}",
                key.chars().take(12).collect::<String>()
            ),
            path,
        })
}

/// `6.1.0-41-cloud-amd64` as its runs of digits, so 6.1.0-41 sorts after 6.1.0-9.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// Boot `kernel` in kiln's VMM (this binary's `__vmm` mode) and cache the result.
pub fn run_and_cache(
    cache: &Cache,
    kernel: &Path,
    timeout: std::time::Duration,
) -> Result<SmokeRecord, SmokeCacheError> {
    let key = SmokeKey::for_kernel(kernel).map_err(|source| SmokeCacheError::Kernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(SmokeCacheError::Exe)?;
    // Short and in /tmp: the VMM's control socket lives here (108-byte path limit).
    let work = tempfile::Builder::new()
        .prefix("kiln-smoke-")
        .tempdir()
        .map_err(|source| SmokeCacheError::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    let outcome = kiln_vmm::smoke::run(&exe, kernel, work.path(), timeout)?;
    let record = SmokeRecord {
        host_kernel: key.host_kernel.clone(),
        kiln_version: key.kiln_version.clone(),
        kernel: kernel.to_path_buf(),
        kernel_sha256: key.kernel_sha256.clone(),
        passed: outcome.passed,
        reason: outcome.reason,
        when: crate::events::rfc3339_now(),
        seconds: outcome.seconds,
        console_tail: outcome.console_tail,
    };
    write(&results_dir(cache.root()), &key, &record)?;
    Ok(record)
}

/// Why no smoke test could run: no kernel.
pub const NO_KERNEL: &str =
    "not run: no kernel to try (build a bootstrap source once, or pass --smoke-kernel)";

/// The status `auto` decides with. `may_run`: the probe says kvm, so a missing result is
/// made now (once, bounded) when a kernel is at hand; otherwise only a cached one is read.
pub fn status_for_auto(may_run: bool) -> SmokeStatus {
    let Ok(root) = Cache::root_from_env() else {
        return SmokeStatus::NotRun("not run: no kiln cache folder (set KILN_CACHE)".into());
    };
    if let Some(r) = latest_here(&results_dir(&root)) {
        return SmokeStatus::Done(r);
    }
    if !may_run {
        return SmokeStatus::NotRun("not run yet (run `kiln doctor`)".into());
    }
    let Some(kernel) = find_kernel(&root) else {
        return SmokeStatus::NotRun(NO_KERNEL.into());
    };
    eprintln!(
        "kiln: checking once that kiln's VMM runs a stock kernel on this host (smoke test of {} \
         from {}, at most {} s; `kiln doctor` shows it)",
        kernel.path.display(),
        kernel.origin,
        kiln_vmm::smoke::DEFAULT_TIMEOUT.as_secs()
    );
    let ran = Cache::open(root)
        .map_err(SmokeCacheError::from)
        .and_then(|c| run_and_cache(&c, &kernel.path, kiln_vmm::smoke::DEFAULT_TIMEOUT));
    match ran {
        Ok(r) => SmokeStatus::Done(r),
        Err(e) => SmokeStatus::NotRun(format!("could not run: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, when: &str, passed: bool) -> SmokeRecord {
        SmokeRecord {
            host_kernel: host.into(),
            kiln_version: "0.1.0".into(),
            kernel: "/k".into(),
            kernel_sha256: "ab".into(),
            passed,
            reason: if passed { "ok" } else { "timeout" }.into(),
            when: when.into(),
            seconds: 1.0,
            console_tail: String::new(),
        }
    }

    fn key(host: &str, digest: &str) -> SmokeKey {
        SmokeKey {
            host_kernel: host.into(),
            kiln_version: "0.1.0".into(),
            kernel_sha256: digest.into(),
        }
    }

    #[test]
    fn the_key_changes_with_each_input() {
        let a = key("6.1", "ab");
        assert_eq!(a.file_stem(), key("6.1", "ab").file_stem());
        assert_ne!(a.file_stem(), key("6.2", "ab").file_stem());
        assert_ne!(a.file_stem(), key("6.1", "cd").file_stem());
        let mut v = a.clone();
        v.kiln_version = "0.2.0".into();
        assert_ne!(a.file_stem(), v.file_stem());
        assert_eq!(a.file_stem().len(), 64);
    }

    #[test]
    fn key_for_a_kernel_file_hashes_it() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinuz");
        fs::write(&k, b"kernel").unwrap();
        let key = SmokeKey::for_kernel(&k).unwrap();
        assert_eq!(key.kernel_sha256, sha256_bytes(b"kernel"));
        assert_eq!(key.host_kernel, host_kernel_release());
        assert!(SmokeKey::for_kernel(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn results_round_trip_and_the_newest_for_this_host_wins() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("smoke");
        assert_eq!(latest_for(&d, "6.1", "0.1.0"), None);
        let old = record("6.1", "2026-12-01T10:00:00.000Z", true);
        let new = record("6.1", "2026-12-07T10:00:00.000Z", false);
        let other_host = record("6.9", "2026-12-08T10:00:00.000Z", true);
        write(&d, &key("6.1", "old"), &old).unwrap();
        write(&d, &key("6.1", "new"), &new).unwrap();
        write(&d, &key("6.9", "x"), &other_host).unwrap();
        assert_eq!(read(&d, &key("6.1", "old")), Some(old));
        assert_eq!(read(&d, &key("6.1", "none")), None);
        assert_eq!(latest_for(&d, "6.1", "0.1.0"), Some(new));
        assert_eq!(latest_for(&d, "6.1", "9.9.9"), None);
        // No temp files are left, and a broken file is ignored.
        fs::write(d.join("junk.json"), b"{").unwrap();
        assert_eq!(latest_for(&d, "6.9", "0.1.0"), Some(other_host));
        assert!(fs::read_dir(&d).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn the_newest_bootstrap_kernel_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("bootstrap");
        for (key, version, with_kernel) in [
            ("aaa", "6.1.0-9-cloud-amd64", true),
            ("bbb", "6.1.0-41-cloud-amd64", true),
            ("ccc", "6.1.0-99-cloud-amd64", false),
        ] {
            let e = boot.join(key);
            fs::create_dir_all(&e).unwrap();
            fs::write(
                e.join("meta.json"),
                format!(r#"{{"kernelVersion":"{version}","other":1}}"#),
            )
            .unwrap();
            if with_kernel {
                fs::write(e.join("vmlinuz"), b"k").unwrap();
            }
        }
        fs::create_dir_all(boot.join("ddd")).unwrap(); // no meta.json: skipped
        let k = newest_bootstrap_kernel(&boot).unwrap();
        assert_eq!(k.path, boot.join("bbb/vmlinuz"));
        assert_eq!(k.origin, "bootstrap base bbb");
        assert_eq!(newest_bootstrap_kernel(&dir.path().join("absent")), None);
    }
}
