//! The content-addressed cache (`$KILN_CACHE`, else `~/.cache/kiln`).
//!
//! Layout:
//! - `blobs/sha256/<hex>`: downloaded and imported images, named by the digest of their bytes.
//! - `partial/<hex of url>`: an interrupted download, resumed with an HTTP Range request.
//! - `bootstrap/<key>/`: a bootstrapped root (disk, kernel, initrd, `meta.json`), named by the
//!   digest of its inputs (see [`crate::sources::bootstrap`]).
//! - `boot/<hex>/`: kernel and initrd extracted from an image, named by the image's digest.
//! - `tmp/`: work in progress; everything is built there and renamed into place, so a cache
//!   entry is either complete or absent.
//! - `lock`: every user of the cache holds a shared `flock` on it for as long as it may read
//!   or write entries; [`prune`] takes it exclusively, so nothing a running build uses is
//!   ever deleted under it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot find a cache folder: set KILN_CACHE or HOME")]
    NoHome,
    #[error("cache folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the cache {} is in use by a running build (or another kiln command); try again \
         once it ends",
        root.display()
    )]
    InUse { root: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A cache root, with a shared lock on it while any clone of this value lives.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    _lock: Arc<fs::File>,
}

const LOCK_FILE: &str = "lock";

/// `flock(2)` on `<root>/lock`: shared, or exclusive without waiting (false if held).
fn lock(root: &Path, exclusive: bool) -> Result<Option<fs::File>, CacheError> {
    let p = root.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io_err(&p))?;
    // std's locks are flock(2) on Linux, EINTR retried.
    if !exclusive {
        f.lock_shared().map_err(io_err(&p))?;
        return Ok(Some(f));
    }
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&p)(e)),
    }
}

impl Cache {
    /// `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn from_env() -> Result<Self, CacheError> {
        Self::open(Self::root_from_env()?)
    }

    /// Where [`from_env`](Self::from_env) opens the cache (nothing opened or locked).
    pub fn root_from_env() -> Result<PathBuf, CacheError> {
        if let Some(p) = std::env::var_os("KILN_CACHE").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p).join("kiln"));
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or(CacheError::NoHome)?;
        Ok(PathBuf::from(home).join(".cache").join("kiln"))
    }

    /// A cache at `root`, created if needed.
    pub fn open(root: PathBuf) -> Result<Self, CacheError> {
        for sub in ["blobs/sha256", "partial", "bootstrap", "boot", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        // Waits while a prune runs (it is short).
        let f = lock(&root, false)?.ok_or_else(|| CacheError::InUse { root: root.clone() })?;
        Ok(Self {
            root,
            _lock: Arc::new(f),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob with this digest lives (whether or not it exists yet).
    pub fn blob_path(&self, sha256_hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256_hex)
    }

    /// The blob with this digest, if the cache holds it.
    pub fn blob(&self, sha256_hex: &str) -> Option<PathBuf> {
        let p = self.blob_path(sha256_hex);
        p.is_file().then_some(p)
    }

    pub fn partial_path(&self, key: &str) -> PathBuf {
        self.root.join("partial").join(key)
    }

    pub fn bootstrap_dir(&self, key: &str) -> PathBuf {
        self.root.join("bootstrap").join(key)
    }

    pub fn boot_dir(&self, key: &str) -> PathBuf {
        self.root.join("boot").join(key)
    }

    /// A fresh work folder under `tmp/`, removed when the guard drops unless kept.
    pub fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir, CacheError> {
        let base = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&base)
            .map_err(io_err(&base))
    }

    /// Moves a finished file into the blob store under its digest. If another build stored the
    /// same blob meanwhile, the existing one wins (same bytes by construction).
    pub fn store_blob(&self, tmp: &Path, sha256_hex: &str) -> Result<PathBuf, CacheError> {
        let dst = self.blob_path(sha256_hex);
        if dst.is_file() {
            let _ = fs::remove_file(tmp);
            return Ok(dst);
        }
        fs::rename(tmp, &dst).map_err(io_err(&dst))?;
        Ok(dst)
    }
}

/// What a cache entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A downloaded or imported image (`blobs/sha256/`).
    Blob,
    /// An interrupted download (`partial/`).
    Partial,
    /// A bootstrapped root (`bootstrap/`).
    Bootstrap,
    /// Kernel and initrd taken from an image (`boot/`).
    Boot,
    /// Work left by a build that did not finish (`tmp/`).
    Tmp,
    /// A step cache layer (`layers/`, see [`crate::step_cache`]).
    Layer,
}

impl EntryKind {
    const ALL: [(EntryKind, &'static str); 6] = [
        (EntryKind::Blob, "blobs/sha256"),
        (EntryKind::Partial, "partial"),
        (EntryKind::Bootstrap, "bootstrap"),
        (EntryKind::Boot, "boot"),
        (EntryKind::Tmp, "tmp"),
        (EntryKind::Layer, crate::step_cache::store::LAYERS_DIR),
    ];

    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Blob => "blob",
            EntryKind::Partial => "partial",
            EntryKind::Bootstrap => "bootstrap",
            EntryKind::Boot => "boot",
            EntryKind::Tmp => "tmp",
            EntryKind::Layer => "layer",
        }
    }
}

/// One entry of the cache.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub kind: EntryKind,
    pub key: String,
    pub path: PathBuf,
    /// Bytes allocated on disk (what removing it frees).
    pub size: u64,
    /// The latest access or change time of its files (access times are day-accurate under
    /// the usual `relatime` mounts, and absent under `noatime`).
    #[serde(with = "unix_secs")]
    pub last_used: SystemTime,
    /// For a layer: what its record says (None for a layer without a readable record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerSummary>,
}

/// What `kiln cache ls` shows of a layer.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerSummary {
    pub module: String,
    pub vm: String,
    /// 1-based.
    pub step: usize,
    pub step_name: String,
    pub parent: Option<String>,
    /// The modules (in the folder `kiln cache` was given) whose record names this layer.
    pub used_by: Vec<String>,
}

mod unix_secs {
    use std::time::SystemTime;
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        s.serialize_u64(secs)
    }
}

/// Size and last use of a file or folder (symlinks are not followed).
fn usage(path: &Path) -> io::Result<(u64, SystemTime)> {
    let m = fs::symlink_metadata(path)?;
    let t = |secs: i64, nsec: i64| {
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(secs.max(0) as u64)
            + Duration::from_nanos(nsec.max(0) as u64)
    };
    let mut size = m.blocks() * 512;
    let mut last = t(m.atime(), m.atime_nsec()).max(t(m.mtime(), m.mtime_nsec()));
    if m.is_dir() {
        // A folder a running bootstrap holds (mmdebstrap's unshared user owns it) cannot be
        // read even by root: it counts as empty rather than failing the whole listing.
        let rd = match fs::read_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok((size, last)),
            r => r?,
        };
        for e in rd {
            let p = e?.path();
            let (s, l) = match usage(&p) {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => continue,
                r => r?,
            };
            size += s;
            last = last.max(l);
        }
    }
    Ok((size, last))
}

impl Cache {
    /// Every entry, by kind then key. Lock files are not entries.
    pub fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let mut out = Vec::new();
        for (kind, sub) in EntryKind::ALL {
            let dir = self.root.join(sub);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for e in rd {
                let e = e.map_err(io_err(&dir))?;
                let key = e.file_name().to_string_lossy().into_owned();
                if key.ends_with(".lock") {
                    continue;
                }
                let path = e.path();
                let (size, mut last_used) = usage(&path).map_err(io_err(&path))?;
                if kind == EntryKind::Layer {
                    // Listing reads a layer's record (its access time): a layer's use is
                    // the modification time a build that reuses it sets on the record.
                    if let Ok(t) = fs::metadata(path.join("layer.json")).and_then(|m| m.modified())
                    {
                        last_used = t;
                    }
                }
                let layer = (kind == EntryKind::Layer)
                    .then(|| crate::step_cache::store::read_record(&path))
                    .flatten()
                    .map(|r| LayerSummary {
                        module: r.module,
                        vm: r.vm,
                        step: r.step,
                        step_name: r.step_name,
                        parent: r.parent,
                        used_by: Vec::new(),
                    });
                out.push(Entry {
                    kind,
                    key,
                    path,
                    size,
                    last_used,
                    layer,
                });
            }
        }
        out.sort_by(|a, b| (a.kind.name(), &a.key).cmp(&(b.kind.name(), &b.key)));
        Ok(out)
    }
}

/// What [`prune`] removes.
#[derive(Debug, Clone, Copy)]
pub enum PruneWhat {
    /// Everything.
    All,
    /// Entries not used for at least this long.
    OlderThan(Duration),
    /// The least recently used entries until the cache holds at most this many bytes.
    MaxSize(u64),
}

/// Which layers a prune keeps whatever it is asked: the ones modules record, with every
/// layer below them.
pub fn needed_layers(entries: &[Entry], recorded: &BTreeSet<String>) -> BTreeSet<String> {
    let parents: BTreeMap<&str, Option<&str>> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Layer)
        .map(|e| {
            (
                e.key.as_str(),
                e.layer.as_ref().and_then(|l| l.parent.as_deref()),
            )
        })
        .collect();
    let mut keep = BTreeSet::new();
    for k in recorded {
        let mut at = Some(k.as_str());
        while let Some(key) = at {
            if !keep.insert(key.to_string()) {
                break;
            }
            at = parents.get(key).copied().flatten();
        }
    }
    keep
}

/// Removes entries of the cache at `root`, only while no other kiln command holds it (else
/// [`CacheError::InUse`]). Returns what was (or, with `dry_run`, would be) removed.
/// The layers modules record (`recorded`) stay, with every layer below them (see
/// [`needed_layers`]); a layer whose parent goes goes too (it could not be opened without it).
pub fn prune(
    root: &Path,
    what: PruneWhat,
    recorded: &BTreeSet<String>,
    dry_run: bool,
) -> Result<Vec<Entry>, CacheError> {
    for sub in [
        "blobs/sha256",
        "partial",
        "bootstrap",
        "boot",
        "tmp",
        "layers",
    ] {
        let p = root.join(sub);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    let f = lock(root, true)?.ok_or_else(|| CacheError::InUse {
        root: root.to_path_buf(),
    })?;
    // Listing needs a `Cache`; this one shares the exclusive lock's file (not a new lock).
    let cache = Cache {
        root: root.to_path_buf(),
        _lock: Arc::new(f),
    };
    let now = SystemTime::now();
    let all = cache.entries()?;
    let keep = needed_layers(&all, recorded);
    let kept = |e: &Entry| e.kind == EntryKind::Layer && keep.contains(&e.key);
    let mut doomed: BTreeSet<(EntryKind, String)> = BTreeSet::new();
    match what {
        PruneWhat::All | PruneWhat::OlderThan(_) => {
            for e in all.iter().filter(|e| !kept(e)) {
                let old = match what {
                    PruneWhat::OlderThan(d) => {
                        now.duration_since(e.last_used).is_ok_and(|age| age >= d)
                    }
                    _ => true,
                };
                if old {
                    doomed.insert((e.kind, e.key.clone()));
                }
            }
        }
        PruneWhat::MaxSize(max) => {
            let mut total: u64 = all.iter().map(|e| e.size).sum();
            let mut lru: Vec<&Entry> = all.iter().filter(|e| !kept(e)).collect();
            lru.sort_by_key(|e| e.last_used);
            for e in lru {
                if total <= max {
                    break;
                }
                total = total.saturating_sub(e.size);
                doomed.insert((e.kind, e.key.clone()));
            }
        }
    }
    // A layer over one that goes cannot be opened any more: it goes too.
    loop {
        let more: Vec<String> = all
            .iter()
            .filter(|e| e.kind == EntryKind::Layer && !doomed.contains(&(e.kind, e.key.clone())))
            .filter(|e| {
                e.layer
                    .as_ref()
                    .and_then(|l| l.parent.as_ref())
                    .is_some_and(|p| doomed.contains(&(EntryKind::Layer, p.clone())))
            })
            .map(|e| e.key.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        doomed.extend(more.into_iter().map(|k| (EntryKind::Layer, k)));
    }
    let doomed: Vec<Entry> = all
        .into_iter()
        .filter(|e| doomed.contains(&(e.kind, e.key.clone())))
        .collect();
    if dry_run {
        return Ok(doomed);
    }
    for e in &doomed {
        // Renamed out of its place first: an entry is whole or absent, never half there.
        let gone = root
            .join("tmp")
            .join(format!(".prune-{}-{}", e.kind.name(), e.key));
        let from = if e.kind == EntryKind::Tmp {
            e.path.clone()
        } else {
            // What an interrupted prune left under that name goes first.
            let _ = fs::remove_dir_all(&gone).or_else(|_| fs::remove_file(&gone));
            fs::rename(&e.path, &gone).map_err(io_err(&e.path))?;
            gone
        };
        let r = if from.is_dir() {
            fs::remove_dir_all(&from)
        } else {
            fs::remove_file(&from)
        };
        r.map_err(io_err(&from))?;
        if e.kind == EntryKind::Bootstrap {
            let _ = fs::remove_file(e.path.with_file_name(format!("{}.lock", e.key)));
        }
    }
    Ok(doomed)
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The SHA-256 of bytes, as lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Parses a manifest checksum (`sha256:<hex>` or bare hex) into lowercase hex.
pub fn parse_sha256(s: &str) -> Option<String> {
    let hex_part = s.strip_prefix("sha256:").unwrap_or(s).trim();
    (hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex_part.to_ascii_lowercase())
}

/// `1.5 GiB`, `12.0 KiB`, `512 B`: binary units, one decimal.
pub fn human_size(n: u64) -> String {
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
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_store_and_digests() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c")).unwrap();
        let tmp = cache.root().join("tmp/x");
        fs::write(&tmp, b"abc").unwrap();
        let d = sha256_file(&tmp).unwrap();
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d, sha256_bytes(b"abc"));
        let p = cache.store_blob(&tmp, &d).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(cache.blob(&d), Some(p));
        assert!(cache.blob(&"0".repeat(64)).is_none());
    }

    #[test]
    fn checksum_forms() {
        let h = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_sha256(&format!("sha256:{h}")), Some(h.to_lowercase()));
        assert_eq!(parse_sha256(h), Some(h.to_lowercase()));
        assert_eq!(parse_sha256("sha256:abc"), None);
        assert_eq!(parse_sha256(&"g".repeat(64)), None);
    }

    #[test]
    fn ls_and_prune_by_age_and_all() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        let cache = Cache::open(root.clone()).unwrap();
        let blob = cache.blob_path(&"a".repeat(64));
        fs::write(&blob, vec![1u8; 10_000]).unwrap();
        let boot = cache.bootstrap_dir("k1");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("disk.qcow2"), vec![2u8; 50_000]).unwrap();
        fs::write(root.join("bootstrap/k1.lock"), b"").unwrap();
        // The blob was last used long ago.
        let old = SystemTime::now() - Duration::from_secs(40 * 86400);
        let f = fs::File::options().write(true).open(&blob).unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(old).set_modified(old))
            .unwrap();

        let es = cache.entries().unwrap();
        let kinds: Vec<_> = es.iter().map(|e| (e.kind, e.key.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (EntryKind::Blob, "a".repeat(64).as_str()),
                (EntryKind::Bootstrap, "k1")
            ]
        );
        assert!(es[1].size >= 50_000, "{:?}", es[1]);

        // While a user of the cache lives, prune refuses and removes nothing.
        let e = prune(&root, PruneWhat::All, &BTreeSet::new(), false).unwrap_err();
        assert!(matches!(e, CacheError::InUse { .. }), "{e}");
        assert!(blob.is_file());
        drop(cache);

        let month = Duration::from_secs(30 * 86400);
        let would = prune(&root, PruneWhat::OlderThan(month), &BTreeSet::new(), true).unwrap();
        assert_eq!(would.len(), 1);
        assert!(blob.is_file(), "a dry run removes nothing");
        let gone = prune(&root, PruneWhat::OlderThan(month), &BTreeSet::new(), false).unwrap();
        assert_eq!(gone[0].kind, EntryKind::Blob);
        assert!(!blob.exists() && boot.is_dir());

        let gone = prune(&root, PruneWhat::All, &BTreeSet::new(), false).unwrap();
        assert_eq!(gone.len(), 1);
        assert!(!boot.exists() && !root.join("bootstrap/k1.lock").exists());
        let cache = Cache::open(root).unwrap();
        assert!(cache.entries().unwrap().is_empty());
        assert_eq!(fs::read_dir(cache.root().join("tmp")).unwrap().count(), 0);
    }

    /// A layer folder with a record naming `parent`, last used `days` ago.
    fn layer(root: &Path, key: &str, parent: Option<&str>, days: u64) {
        let dir = root.join("layers").join(key);
        fs::create_dir_all(&dir).unwrap();
        let rec = serde_json::json!({
            "format": 1, "key": key, "parent": parent, "module": "m", "vm": "v", "step": 1,
            "stepName": "s", "stepKind": "shell", "seconds": 1.0, "created": 0, "disks": [],
        });
        let p = dir.join("layer.json");
        fs::write(&p, rec.to_string()).unwrap();
        let t = SystemTime::now() - Duration::from_secs(days * 86400);
        for f in [&p, &dir] {
            fs::File::open(f)
                .unwrap()
                .set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
                .unwrap();
        }
    }

    #[test]
    fn prune_keeps_the_layers_modules_record_and_their_parents_and_drops_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        drop(Cache::open(root.clone()).unwrap());
        // a <- b <- c (a module records c); a <- d; x <- y (x is new, y old).
        layer(&root, "a", None, 40);
        layer(&root, "b", Some("a"), 40);
        layer(&root, "c", Some("b"), 40);
        layer(&root, "d", Some("a"), 40);
        layer(&root, "x", None, 40);
        layer(&root, "y", Some("x"), 0);
        let entries = Cache::open(root.clone()).unwrap().entries().unwrap();
        let summary = entries.iter().find(|e| e.key == "c").unwrap();
        assert_eq!(summary.layer.as_ref().unwrap().parent.as_deref(), Some("b"));
        let recorded = BTreeSet::from(["c".to_string()]);
        let keep = needed_layers(&entries, &recorded);
        assert_eq!(keep, BTreeSet::from(["a".into(), "b".into(), "c".into()]));
        drop(entries);

        let month = Duration::from_secs(30 * 86400);
        let gone = prune(&root, PruneWhat::OlderThan(month), &recorded, false).unwrap();
        let mut keys: Vec<&str> = gone.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        // d is old; x is old and y, though recent, cannot be opened without it.
        assert_eq!(keys, ["d", "x", "y"]);
        for k in ["a", "b", "c"] {
            assert!(root.join("layers").join(k).is_dir(), "{k} kept");
        }
        // --all keeps what modules need too.
        let gone = prune(&root, PruneWhat::All, &recorded, false).unwrap();
        assert!(gone.is_empty());
        let gone = prune(&root, PruneWhat::MaxSize(0), &BTreeSet::new(), false).unwrap();
        assert_eq!(gone.len(), 3, "nothing kept: all go to meet the size");
    }
}
