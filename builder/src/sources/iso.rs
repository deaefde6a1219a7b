//! `isos`: installer media fetched into the cache through the `url` downloader, and trusted
//! for `isoCacheTTL` only. A small record per blob (`iso-checks/<sha256>.json`) keeps when
//! its bytes were last hashed, with the size and modification time they had: past the TTL, or
//! once the file changed, a cached ISO is hashed again, and a mismatch is an error, never a
//! silent re-use. An ISO given without a checksum is pinned to the digest kiln computed, by
//! URL, for the TTL too; past it, the URL is downloaded again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::url::{self, DownloadError};
use crate::cache::{sha256_bytes, sha256_file, Cache};
use crate::events::{Event, EventSink};

/// Why an ISO could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(
        "the cached copy {} no longer matches sha256:{expected} (it is now sha256:{actual}); \
         remove it to download the ISO again",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An ISO in the cache.
#[derive(Debug, Clone)]
pub struct FetchedIso {
    pub path: PathBuf,
    pub sha256: String,
    /// What was done to have it, for the build's note.
    pub how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Downloaded,
    /// From the cache, checked within the TTL.
    Cached,
    /// From the cache, hashed again (the TTL had passed or the file changed).
    Rechecked,
}

/// The last time a blob's bytes were hashed, and the file as it was then.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Checked {
    checked_at: u64,
    size: u64,
    modified_ns: u128,
}

/// The digest a URL had when it was last downloaded (for ISOs given without a checksum).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pin {
    sha256: String,
    checked_at: u64,
}

/// Fetches the ISO at `url` (checked against `sha256` when given) into the cache, hashing a
/// cached copy again when its last check is older than `ttl`.
pub fn fetch(
    cache: &Cache,
    url: &str,
    sha256: Option<&str>,
    ttl: Duration,
    vm: &str,
    events: &dyn EventSink,
) -> Result<FetchedIso, IsoError> {
    let checks = checks_dir(cache)?;
    let pin_path = checks.join(format!("url-{}.json", sha256_bytes(url.as_bytes())));
    let want = match sha256 {
        Some(s) => Some(s.to_string()),
        None => read_json::<Pin>(&pin_path)
            .filter(|p| fresh(p.checked_at, ttl))
            .map(|p| p.sha256),
    };
    if let Some(want) = &want {
        if let Some(path) = cache.blob(want) {
            let record = checks.join(format!("{want}.json"));
            let now_file = stat(&path)?;
            let trusted = read_json::<Checked>(&record)
                .is_some_and(|c| fresh(c.checked_at, ttl) && (c.size, c.modified_ns) == now_file);
            if trusted {
                return Ok(FetchedIso {
                    path,
                    sha256: want.clone(),
                    how: How::Cached,
                });
            }
            events.emit(&Event::Note {
                vm: Some(vm.to_string()),
                message: format!("checking the cached ISO {url} again (isoCacheTTL)"),
            });
            let actual = sha256_file(&path).map_err(|source| IsoError::Io {
                path: path.clone(),
                source,
            })?;
            if &actual != want {
                return Err(IsoError::Corrupt {
                    path,
                    expected: want.clone(),
                    actual,
                });
            }
            write_json(&record, &checked(now_file))?;
            return Ok(FetchedIso {
                path,
                sha256: actual,
                how: How::Rechecked,
            });
        }
    }
    events.emit(&Event::Note {
        vm: Some(vm.to_string()),
        message: format!("fetching ISO {url}"),
    });
    let f = url::fetch(cache, url, sha256, Some(vm), events)?;
    // Hashed just now by the download (or, from the cache under its checksum, by the check
    // that stored it): record it as checked.
    write_json(
        &checks.join(format!("{}.json", f.sha256)),
        &checked(stat(&f.path)?),
    )?;
    if sha256.is_none() {
        write_json(
            &pin_path,
            &Pin {
                sha256: f.sha256.clone(),
                checked_at: now_secs(),
            },
        )?;
    }
    Ok(FetchedIso {
        path: f.path,
        sha256: f.sha256,
        how: if f.cached {
            How::Cached
        } else {
            How::Downloaded
        },
    })
}

fn checks_dir(cache: &Cache) -> Result<PathBuf, IsoError> {
    let dir = cache.root().join("iso-checks");
    fs::create_dir_all(&dir).map_err(|source| IsoError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a check at `at` (seconds since the epoch) is younger than `ttl`. A time in the
/// future (a clock set back) is not trusted.
fn fresh(at: u64, ttl: Duration) -> bool {
    let now = now_secs();
    at <= now && Duration::from_secs(now - at) < ttl
}

fn checked((size, modified_ns): (u64, u128)) -> Checked {
    Checked {
        checked_at: now_secs(),
        size,
        modified_ns,
    }
}

/// The file's size and modification time: a change of either means its bytes changed.
fn stat(path: &Path) -> Result<(u64, u128), IsoError> {
    let m = fs::metadata(path).map_err(|source| IsoError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((m.len(), modified))
}

/// A record, or None when it is absent or unreadable (the blob is then hashed again).
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), IsoError> {
    let io_err = |source| IsoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_vec(value).map_err(|e| io_err(io::Error::other(e)))?;
    // Written aside and renamed, so a concurrent build never reads half a record.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, text).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::MemorySink;
    use std::sync::atomic::Ordering;

    fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        super::super::url::tests::serve(body, None)
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn a_long_ttl_trusts_the_cached_iso_and_a_short_one_finds_it_corrupted() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let data = b"CD001 an installer".repeat(1000);
        let sum = sha256_bytes(&data);
        let (url, hits) = serve(data);
        let ev = MemorySink::default();
        let f = fetch(&cache, &url, Some(&sum), DAY, "a", &ev).unwrap();
        assert_eq!(f.how, How::Downloaded);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let again = fetch(&cache, &url, Some(&sum), DAY, "a", &ev).unwrap();
        assert_eq!(again.how, How::Cached, "within the TTL: not hashed again");
        assert_eq!(hits.load(Ordering::SeqCst), 1, "and not downloaded again");

        // Past a short TTL the copy is hashed again; unchanged, it is used.
        let zero = Duration::ZERO;
        let r = fetch(&cache, &url, Some(&sum), zero, "a", &ev).unwrap();
        assert_eq!(r.how, How::Rechecked);

        // Bit rot keeps the file's size and time: only the TTL finds it.
        let meta = fs::metadata(&f.path).unwrap();
        let mut bytes = fs::read(&f.path).unwrap();
        bytes[7] ^= 0xff;
        fs::write(&f.path, &bytes).unwrap();
        let file = fs::File::options().write(true).open(&f.path).unwrap();
        file.set_modified(meta.modified().unwrap()).unwrap();
        drop(file);
        let long = fetch(&cache, &url, Some(&sum), DAY, "a", &ev).unwrap();
        assert_eq!(long.how, How::Cached, "a long TTL does not hash again");
        let e = fetch(&cache, &url, Some(&sum), zero, "a", &ev).unwrap_err();
        assert!(matches!(e, IsoError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("no longer matches"), "{e}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "never re-used or re-fetched"
        );
    }

    #[test]
    fn a_changed_file_is_hashed_again_whatever_the_ttl() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let data = b"an installer".to_vec();
        let sum = sha256_bytes(&data);
        let (url, _) = serve(data);
        let ev = MemorySink::default();
        let f = fetch(&cache, &url, Some(&sum), DAY, "a", &ev).unwrap();
        fs::write(&f.path, b"another installer!").unwrap();
        let e = fetch(&cache, &url, Some(&sum), DAY, "a", &ev).unwrap_err();
        assert!(matches!(e, IsoError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn without_a_checksum_the_digest_is_pinned_for_the_ttl() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let data = b"an installer without a checksum".to_vec();
        let (url, hits) = serve(data.clone());
        let ev = MemorySink::default();
        let f = fetch(&cache, &url, None, DAY, "a", &ev).unwrap();
        assert_eq!(f.sha256, sha256_bytes(&data));
        let again = fetch(&cache, &url, None, DAY, "a", &ev).unwrap();
        assert_eq!((again.how, again.sha256), (How::Cached, f.sha256.clone()));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // Past the TTL the URL is asked again.
        let past = fetch(&cache, &url, None, Duration::ZERO, "a", &ev).unwrap();
        assert_eq!(past.sha256, f.sha256);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}
