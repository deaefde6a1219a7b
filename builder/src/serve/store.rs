//! The folder of manifests `kiln serve` edits: listing, reading and atomic writes. Names are
//! plain file names ending in `.yaml`/`.yml`, never paths, so a request cannot reach outside
//! the folder.

use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is not a manifest name: use a file name ending in .yaml or .yml, without '/'")]
    BadName(String),
    #[error("manifest {0:?} does not exist")]
    Missing(String),
    #[error("manifest {name:?} is {size} bytes: the limit is {limit} bytes")]
    TooBig { name: String, size: u64, limit: u64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest file names in the folder, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            what: "cannot list",
            path: self.dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    pub fn read(&self, name: &str) -> Result<String, StoreError> {
        let path = self.path_of(name)?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(name.to_string()))
            }
            Err(source) => {
                return Err(StoreError::Io {
                    what: "cannot read",
                    path,
                    source,
                })
            }
        };
        let limit = crate::manifest::MAX_FILE_BYTES;
        if meta.len() > limit {
            return Err(StoreError::TooBig {
                name: name.to_string(),
                size: meta.len(),
                limit,
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            what: "cannot read",
            path: path.clone(),
            source,
        })?;
        // Non-UTF-8 bytes are shown replaced; the validator reports the exact place.
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Write through a temporary file in the same folder, synced, then renamed over the name:
    /// a crash leaves the old manifest or the new one, never half of one.
    pub fn write(&self, name: &str, text: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        let io = |what, source| StoreError::Io {
            what,
            path: path.clone(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(|e| io("cannot create a temporary file for", e))?;
        tmp.write_all(text.as_bytes())
            .map_err(|e| io("cannot write", e))?;
        tmp.as_file().sync_all().map_err(|e| io("cannot sync", e))?;
        tmp.persist(&path)
            .map_err(|e| io("cannot rename into place", e.error))?;
        Ok(())
    }
}

fn valid_name(n: &str) -> bool {
    (n.ends_with(".yaml") || n.ends_with(".yml"))
        && !n.starts_with('.')
        && !n.contains(['/', '\\', '\0'])
        && n.len() <= 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_folder() {
        let s = Store::new(PathBuf::from("/tmp"));
        for bad in ["../x.yaml", "a/b.yaml", ".hidden.yaml", "x.txt", ""] {
            assert!(
                matches!(s.path_of(bad), Err(StoreError::BadName(_))),
                "{bad}"
            );
        }
        assert!(s.path_of("m.yaml").is_ok());
    }

    #[test]
    fn write_replaces_atomically_and_lists() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = Store::new(d.path().to_path_buf());
        s.write("a.yaml", "vms: []\n").expect("write");
        s.write("a.yaml", "vms: [1]\n").expect("rewrite");
        assert_eq!(s.read("a.yaml").expect("read"), "vms: [1]\n");
        assert_eq!(s.list().expect("list"), vec!["a.yaml".to_string()]);
        assert!(matches!(s.read("b.yaml"), Err(StoreError::Missing(_))));
    }
}
