//! `url` sources: download once into the cache, with a progress display, resume after an
//! interruption (HTTP Range on the partial file), and a SHA-256 check before anything boots.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::cache::{sha256_bytes, Cache};
use crate::events::{Event, EventSink};

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "cannot reach {host} to download {url}: {reason}. kiln is offline or the host is \
         unreachable; put the image in the cache with a `file` source, or retry when online"
    )]
    Offline {
        url: String,
        host: String,
        reason: String,
    },
    #[error("download of {url} failed: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("download of {url} failed: {reason}")]
    Transfer { url: String, reason: String },
    #[error(
        "checksum mismatch for {url}: the manifest says sha256:{expected}, the download is \
         sha256:{actual}; nothing was booted"
    )]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported URL {url}: only http:// and https:// are downloaded")]
    Scheme { url: String },
    #[error("cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("writing the download of {url} to {path}: {source}")]
    Write {
        url: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The result of fetching a URL.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    /// Whether it came from the cache without any network access.
    pub cached: bool,
}

/// Fetches `url` into the cache. With a known `sha256` a cached blob is used without touching
/// the network; without one, the URL is downloaded and its digest recorded.
pub fn fetch(
    cache: &Cache,
    url: &str,
    expected_sha256: Option<&str>,
    vm: Option<&str>,
    events: &dyn EventSink,
) -> Result<Fetched, DownloadError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(DownloadError::Scheme { url: url.into() });
    }
    if let Some(sum) = expected_sha256 {
        if let Some(path) = cache.blob(sum) {
            return Ok(Fetched {
                path,
                sha256: sum.to_string(),
                cached: true,
            });
        }
    }
    // The partial file is keyed by the URL so an interrupted download resumes.
    let partial = cache.partial_path(&sha256_bytes(url.as_bytes()));
    let write_err = |source| DownloadError::Write {
        url: url.into(),
        path: partial.clone(),
        source,
    };
    let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut req = agent.get(url).header("Accept-Encoding", "identity");
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let resp = req.call().map_err(|e| classify(url, e))?;
    let status = resp.status().as_u16();
    let append = match status {
        206 if have > 0 => true,
        200 => {
            have = 0;
            false
        }
        // The partial file is already complete (or the server disagrees about its size):
        // start again from zero.
        416 => {
            let _ = fs::remove_file(&partial);
            return fetch(cache, url, expected_sha256, vm, events);
        }
        s => {
            return Err(DownloadError::Status {
                url: url.into(),
                status: s,
            })
        }
    };
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + have);

    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&partial)
        .map_err(write_err)?;
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 256 << 10];
    let mut done = have;
    let mut last = Instant::now();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(DownloadError::Transfer {
                    url: url.into(),
                    reason: format!("{e} after {done} bytes (run again to resume)"),
                })
            }
        };
        file.write_all(&buf[..n]).map_err(write_err)?;
        done += n as u64;
        if last.elapsed() > Duration::from_millis(250) {
            last = Instant::now();
            events.emit(&Event::Progress {
                vm: vm.map(str::to_string),
                what: "download".into(),
                done,
                total,
            });
        }
    }
    file.sync_all().map_err(write_err)?;
    drop(file);
    if let Some(t) = total {
        if done != t {
            return Err(DownloadError::Transfer {
                url: url.into(),
                reason: format!("got {done} of {t} bytes (run again to resume)"),
            });
        }
    }

    let actual = digest_file(&partial).map_err(write_err)?;
    if let Some(expected) = expected_sha256 {
        if expected != actual {
            // A corrupt partial file must not be resumed next time.
            let _ = fs::remove_file(&partial);
            return Err(DownloadError::Checksum {
                url: url.into(),
                expected: expected.into(),
                actual,
            });
        }
    }
    let path = cache.store_blob(&partial, &actual)?;
    Ok(Fetched {
        path,
        sha256: actual,
        cached: false,
    })
}

fn digest_file(path: &std::path::Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    rest.split(['/', '?', '#'])
        .next()
        .unwrap_or(rest)
        .to_string()
}

fn classify(url: &str, e: ureq::Error) -> DownloadError {
    match e {
        ureq::Error::StatusCode(status) => DownloadError::Status {
            url: url.into(),
            status,
        },
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_) => {
            DownloadError::Offline {
                url: url.into(),
                host: host_of(url),
                reason: e.to_string(),
            }
        }
        ureq::Error::Io(ref io) if is_offline_io(io) => DownloadError::Offline {
            url: url.into(),
            host: host_of(url),
            reason: e.to_string(),
        },
        other => DownloadError::Transfer {
            url: url.into(),
            reason: other.to_string(),
        },
    }
}

fn is_offline_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
    )
}

/// Why the bytes of a `files` entry given by URL could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FileFetchError {
    // Boxed: a download's error is large, and this one travels in every step's error.
    #[error(transparent)]
    Download(Box<DownloadError>),
    /// Reading the cached download.
    #[error(transparent)]
    Read(#[from] io::Error),
    /// Reading a download the build fetched at its start.
    #[error("{url} was fetched at the build's start, but reading {}: {source}", path.display())]
    Prefetched {
        url: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading a download the build fetched at its start, named by its path alone.
    #[error("reading {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<DownloadError> for FileFetchError {
    fn from(e: DownloadError) -> Self {
        FileFetchError::Download(Box::new(e))
    }
}

/// The bytes of a `files` entry given by URL, through the download cache and without
/// progress events.
pub fn fetch_bytes(cache: &Cache, url: &str) -> Result<Vec<u8>, FileFetchError> {
    let f = fetch(
        cache,
        url,
        None,
        None,
        &crate::events::MemorySink::default(),
    )?;
    Ok(fs::read(&f.path)?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::events::MemorySink;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A tiny loopback HTTP server that honours `Range: bytes=N-` and can cut the first
    /// response short, to exercise resume.
    pub(in crate::sources) fn serve(
        data: Vec<u8>,
        cut_first_at: Option<usize>,
    ) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { break };
                let n = h2.fetch_add(1, Ordering::SeqCst);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut start = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        start = v.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let body = &data[start..];
                let status = if start > 0 {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let send = match cut_first_at {
                    Some(c) if n == 0 => &body[..c.min(body.len())],
                    _ => body,
                };
                let _ = s.write_all(send);
            }
        });
        (format!("http://{addr}/image.raw"), hits)
    }

    #[test]
    fn downloads_checks_and_caches() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let sum = sha256_bytes(&data);
        let (url, hits) = serve(data.clone(), None);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_path_buf()).unwrap();
        let ev = MemorySink::default();
        let f = fetch(&cache, &url, Some(&sum), None, &ev).unwrap();
        assert!(!f.cached);
        assert_eq!(fs::read(&f.path).unwrap(), data);
        let g = fetch(&cache, &url, Some(&sum), None, &ev).unwrap();
        assert!(g.cached, "second fetch must come from the cache");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn resumes_an_interrupted_download() {
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 251) as u8).collect();
        let sum = sha256_bytes(&data);
        let (url, hits) = serve(data.clone(), Some(123_456));
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_path_buf()).unwrap();
        let ev = MemorySink::default();
        let err = fetch(&cache, &url, Some(&sum), None, &ev).unwrap_err();
        assert!(matches!(err, DownloadError::Transfer { .. }), "{err}");
        let f = fetch(&cache, &url, Some(&sum), None, &ev).unwrap();
        assert_eq!(fs::read(&f.path).unwrap(), data);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn bad_checksum_is_an_error_and_not_cached() {
        let data = b"not the image you wanted".to_vec();
        let (url, _) = serve(data, None);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_path_buf()).unwrap();
        let wrong = "0".repeat(64);
        let err = fetch(&cache, &url, Some(&wrong), None, &MemorySink::default()).unwrap_err();
        let DownloadError::Checksum { expected, .. } = &err else {
            panic!("want checksum error, got {err}");
        };
        assert_eq!(expected, &wrong);
        assert!(err.to_string().contains("nothing was booted"));
        assert!(cache.blob(&wrong).is_none());
    }

    #[test]
    fn unreachable_host_is_a_clear_offline_error() {
        // A loopback port nobody listens on: connection refused.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_path_buf()).unwrap();
        let url = format!("http://127.0.0.1:{port}/x.qcow2");
        let err = fetch(&cache, &url, None, None, &MemorySink::default()).unwrap_err();
        assert!(matches!(err, DownloadError::Offline { .. }), "{err:?}");
        assert!(err.to_string().contains("offline"));
    }
}
