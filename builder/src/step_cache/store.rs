//! Where layers live: `<cache>/layers/<key>/`, one folder per checkpoint of one VM, holding a
//! qcow2 per writable disk (`disk-<name>.qcow2`, each backed by the same disk of the parent
//! layer, or by the source), the VM's NVRAM when it has one, and `layer.json` (the
//! [`LayerRecord`]: digests, parent, the step and how long it ran).
//!
//! A layer is made in `<cache>/tmp/layer-<key>-<pid>-<n>/` and renamed into place whole, so a
//! killed build leaves at most a folder under `tmp/` (pruned like any other), never half a
//! layer under its key. A layer is trusted only when its record parses, names its own key and
//! every file's SHA-256 matches: a damaged one is never reused, and is replaced by the next
//! build that makes the same step.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::cache::{sha256_file, Cache};

/// The layout of `layer.json`; a record of another format is not trusted.
pub const FORMAT: u32 = 1;
const RECORD: &str = "layer.json";
/// The file a layer keeps a VM's NVRAM in.
pub const NVRAM_FILE: &str = "nvram.fd";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `layer.json`: what a layer holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    pub format: u32,
    pub key: String,
    /// The layer below, or None over the VM's source.
    pub parent: Option<String>,
    /// Which module and VM made it (for `kiln cache ls`; another module with the same inputs
    /// reuses it all the same).
    pub module: String,
    pub vm: String,
    /// The step it follows, 1-based, with its name and kind.
    pub step: usize,
    pub step_name: String,
    pub step_kind: String,
    /// How long the steps since the parent layer ran: what reusing it saves.
    pub seconds: f64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub disks: Vec<LayerFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<LayerFile>,
}

/// One file of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerFile {
    /// The disk's name in the manifest (`nvram` for the NVRAM).
    pub name: String,
    /// The file's name inside the layer folder.
    pub file: String,
    pub sha256: String,
    pub size: u64,
    /// The backing file the disk's header names (absolute), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

/// A layer's disk file name for a disk of the manifest.
pub fn disk_file(disk: &str) -> String {
    format!("disk-{disk}.qcow2")
}

/// The layers of one cache.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
    tmp: PathBuf,
}

/// A layer being made, under `tmp/`; removed when dropped unless published.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Staging {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The subfolder of the cache that holds layers.
pub const LAYERS_DIR: &str = "layers";

static STAGED: AtomicU32 = AtomicU32::new(0);

impl LayerStore {
    pub fn new(cache: &Cache) -> Result<LayerStore, StoreError> {
        Self::at(cache.root())
    }

    /// The layers of the cache at `root` (made if missing).
    pub fn at(root: &Path) -> Result<LayerStore, StoreError> {
        let s = LayerStore {
            root: root.join(LAYERS_DIR),
            tmp: root.join("tmp"),
        };
        for d in [&s.root, &s.tmp] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        s.sweep_staging();
        Ok(s)
    }

    /// Removes the staging folders of kiln processes that are gone (killed mid-checkpoint);
    /// a live one's, whoever it is, stays.
    fn sweep_staging(&self) {
        let Ok(rd) = fs::read_dir(&self.tmp) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("layer-") else {
                continue;
            };
            // layer-<key>-<pid>-<n>
            let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The record of the layer `key` if the layer is whole and its files are what the record
    /// says (every digest checked); None when it is absent or not to be trusted (the reason
    /// is logged).
    pub fn verified(&self, key: &str) -> Option<LayerRecord> {
        let dir = self.dir(key);
        if !dir.is_dir() {
            return None;
        }
        match check(&dir, key) {
            Ok(r) => Some(r),
            Err(why) => {
                tracing::warn!(layer = %dir.display(), "not reusing a cached layer: {why}");
                None
            }
        }
    }

    /// A fresh staging folder for the layer `key`.
    pub fn stage(&self, key: &str) -> Result<Staging, StoreError> {
        let n = STAGED.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .tmp
            .join(format!("layer-{key}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Staging {
            dir,
            published: false,
        })
    }

    /// Writes `record` into the staging folder and moves the folder to its key. A trusted
    /// layer already there (another build made the same step meanwhile) stays, and this one
    /// is left where it is; one not to be trusted is replaced. Returns where the layer is.
    pub fn publish(
        &self,
        staging: &mut Staging,
        record: &LayerRecord,
    ) -> Result<(PathBuf, bool), StoreError> {
        let rec = staging.dir.join(RECORD);
        let json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Json {
            path: rec.clone(),
            source,
        })?;
        write_synced(&rec, &json)?;
        let dest = self.dir(&record.key);
        if dest.exists() {
            if check(&dest, &record.key).is_ok() {
                // Kept under tmp/ for this build only: the VM's overlay is backed by it.
                staging.published = true;
                return Ok((staging.dir.clone(), false));
            }
            let gone = self
                .tmp
                .join(format!(".replaced-{}-{}", record.key, std::process::id()));
            let _ = fs::remove_dir_all(&gone);
            fs::rename(&dest, &gone).map_err(io_err(&dest))?;
            let _ = fs::remove_dir_all(&gone);
        }
        fs::rename(&staging.dir, &dest).map_err(io_err(&dest))?;
        sync_dir(&self.root);
        staging.published = true;
        Ok((dest, true))
    }

    /// Marks the layer used now (what `kiln cache prune --older-than` goes by).
    pub fn touch(&self, key: &str) {
        let p = self.dir(key).join(RECORD);
        if let Ok(f) = fs::File::options().append(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// A layer folder's record as written, unchecked (for listing).
pub fn read_record(dir: &Path) -> Option<LayerRecord> {
    serde_json::from_slice(&fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Why the layer in `dir` is not to be trusted, if it is not.
fn check(dir: &Path, key: &str) -> Result<LayerRecord, String> {
    let rec_path = dir.join(RECORD);
    let text = fs::read(&rec_path).map_err(|e| format!("{}: {e}", rec_path.display()))?;
    let rec: LayerRecord =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", rec_path.display()))?;
    if rec.format != FORMAT {
        return Err(format!(
            "layer format {} (this kiln writes {FORMAT})",
            rec.format
        ));
    }
    if rec.key != key {
        return Err(format!("its record names the key {}", rec.key));
    }
    for f in rec.disks.iter().chain(rec.nvram.as_ref()) {
        // Names come from a file on disk: only plain names inside the folder.
        if f.file.is_empty() || f.file.contains('/') || f.file.starts_with('.') {
            return Err(format!("bad file name `{}` in its record", f.file));
        }
        let p = dir.join(&f.file);
        let got = sha256_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if got != f.sha256 {
            return Err(format!(
                "{} has SHA-256 {got}, its record says {}",
                p.display(),
                f.sha256
            ));
        }
    }
    Ok(rec)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Describes a finished file of a staging folder for its record.
pub fn layer_file(
    staging: &Staging,
    name: &str,
    file: &str,
    backing: Option<String>,
) -> Result<LayerFile, StoreError> {
    let p = staging.dir.join(file);
    let f = fs::File::open(&p).map_err(io_err(&p))?;
    f.sync_all().map_err(io_err(&p))?;
    let size = f.metadata().map_err(io_err(&p))?.len();
    Ok(LayerFile {
        name: name.into(),
        file: file.into(),
        sha256: sha256_file(&p).map_err(io_err(&p))?,
        size,
        backing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, files: Vec<LayerFile>) -> LayerRecord {
        LayerRecord {
            format: FORMAT,
            key: key.into(),
            parent: None,
            module: "m".into(),
            vm: "v".into(),
            step: 1,
            step_name: "s".into(),
            step_kind: "shell".into(),
            seconds: 1.0,
            created: 0,
            disks: files,
            nvram: None,
        }
    }

    fn staged(store: &LayerStore, key: &str, body: &[u8]) -> (Staging, LayerRecord) {
        let s = store.stage(key).unwrap();
        fs::write(s.dir().join("disk-root.qcow2"), body).unwrap();
        let f = layer_file(&s, "root", "disk-root.qcow2", None).unwrap();
        (s, record(key, vec![f]))
    }

    #[test]
    fn a_published_layer_is_trusted_until_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::at(dir.path()).unwrap();
        let key = "a".repeat(64);
        assert!(store.verified(&key).is_none());
        let (mut s, rec) = staged(&store, &key, b"layer bytes");
        let staging_dir = s.dir().to_path_buf();
        let (at, published) = store.publish(&mut s, &rec).unwrap();
        assert!(published);
        assert_eq!(at, store.dir(&key));
        assert!(!staging_dir.exists(), "renamed, not copied");
        assert_eq!(store.verified(&key), Some(rec));
        fs::write(at.join("disk-root.qcow2"), b"layer bytez").unwrap();
        assert!(
            store.verified(&key).is_none(),
            "a damaged layer is not reused"
        );
        // The next build's layer for the same key replaces it.
        let (mut s, rec) = staged(&store, &key, b"fresh bytes");
        let (at, published) = store.publish(&mut s, &rec).unwrap();
        assert!(published);
        assert_eq!(store.verified(&key), Some(rec));
        assert_eq!(
            fs::read(at.join("disk-root.qcow2")).unwrap(),
            b"fresh bytes"
        );
    }

    #[test]
    fn a_trusted_layer_is_kept_and_the_second_copy_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::at(dir.path()).unwrap();
        let key = "b".repeat(64);
        let (mut s, rec) = staged(&store, &key, b"first");
        store.publish(&mut s, &rec).unwrap();
        let (mut s, rec2) = staged(&store, &key, b"second");
        let (at, published) = store.publish(&mut s, &rec2).unwrap();
        assert!(!published);
        assert!(at.starts_with(dir.path().join("tmp")));
        assert_eq!(fs::read(at.join("disk-root.qcow2")).unwrap(), b"second");
        assert_eq!(
            fs::read(store.dir(&key).join("disk-root.qcow2")).unwrap(),
            b"first"
        );
    }

    #[test]
    fn unfinished_or_foreign_records_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::at(dir.path()).unwrap();
        let key = "c".repeat(64);
        // A folder with no record: never trusted.
        fs::create_dir_all(store.dir(&key)).unwrap();
        assert!(store.verified(&key).is_none());
        // A record that names another key, or a file outside the folder.
        let mut rec = record(&"d".repeat(64), vec![]);
        fs::write(
            store.dir(&key).join(RECORD),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        assert!(store.verified(&key).is_none());
        rec.key = key.clone();
        rec.disks.push(LayerFile {
            name: "root".into(),
            file: "../../etc/passwd".into(),
            sha256: String::new(),
            size: 0,
            backing: None,
        });
        fs::write(
            store.dir(&key).join(RECORD),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        assert!(store.verified(&key).is_none());
        // A staging folder dropped unpublished goes away.
        let s = store.stage(&key).unwrap();
        let d = s.dir().to_path_buf();
        drop(s);
        assert!(!d.exists());
        // One a killed kiln left is swept by the next store opened there; a live one's stays.
        let dead = dir.path().join(format!("tmp/layer-{key}-999999999-0"));
        let live = dir.path().join(format!("tmp/layer-{key}-1-0"));
        fs::create_dir_all(&dead).unwrap();
        fs::create_dir_all(&live).unwrap();
        LayerStore::at(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
