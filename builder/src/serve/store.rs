//! The folder of manifests `kiln serve` edits: listing, reading and atomic writes. Names are
//! plain file names ending in `.yaml`/`.yml`, never paths, and only regular files are read or
//! replaced: a symbolic link (which could lead anywhere, e.g. a link in a cloned repository)
//! or a FIFO (which would block a reader) is refused, so a request cannot reach outside the
//! folder.

use crate::path_io::PathIoError;
use std::fs::Metadata;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is not a manifest name: use a file name ending in .yaml or .yml, without '/'")]
    BadName(String),
    #[error("manifest {0:?} does not exist")]
    Missing(String),
    #[error(
        "{0:?} is a symbolic link: kiln serve reads and writes only regular files in its folder"
    )]
    Link(String),
    #[error("{0:?} is not a regular file")]
    NotRegular(String),
    #[error("manifest {name:?} is {size} bytes: the limit is {limit} bytes")]
    TooBig { name: String, size: u64, limit: u64 },
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
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
        let rd = std::fs::read_dir(&self.dir).map_err(PathIoError::at("cannot list", &self.dir))?;
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

    /// What is at `name` now, without following a link: `None` when nothing is.
    fn kind_of(&self, name: &str) -> Result<Option<Metadata>, StoreError> {
        let path = self.path_of(name)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(crate::path_io::PathIoError {
                what: "cannot inspect",
                path,
                source,
            }
            .into()),
        }
    }

    /// The path of an existing manifest that is a regular file in the folder (what a build
    /// may read).
    pub fn manifest_file(&self, name: &str) -> Result<PathBuf, StoreError> {
        match self.kind_of(name)? {
            None => Err(StoreError::Missing(name.to_string())),
            Some(m) => regular(name, &m).and_then(|()| self.path_of(name)),
        }
    }

    pub fn read(&self, name: &str) -> Result<String, StoreError> {
        let path = self.path_of(name)?;
        let io = |source| crate::path_io::PathIoError {
            what: "cannot read",
            path: path.clone(),
            source,
        };
        // O_NOFOLLOW: the last component may not be a link (ELOOP); O_NONBLOCK: opening a
        // FIFO does not wait for a writer. The checks are made on the open file, so nothing
        // can be swapped in between.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(name.to_string()))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StoreError::Link(name.to_string()))
            }
            Err(e) => return Err(io(e).into()),
        };
        let meta = file.metadata().map_err(io)?;
        regular(name, &meta)?;
        let limit = crate::manifest::MAX_FILE_BYTES;
        if meta.len() > limit {
            return Err(StoreError::TooBig {
                name: name.to_string(),
                size: meta.len(),
                limit,
            });
        }
        let mut bytes = Vec::new();
        file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() as u64 > limit {
            return Err(StoreError::TooBig {
                name: name.to_string(),
                size: bytes.len() as u64,
                limit,
            });
        }
        // Non-UTF-8 bytes are shown replaced; the validator reports the exact place.
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Write through a temporary file in the same folder, synced, then renamed over the name:
    /// a crash leaves the old manifest or the new one, never half of one. A link or other
    /// non-regular file at the name is refused, not replaced (the rename itself never follows
    /// a link).
    pub fn write(&self, name: &str, text: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        if let Some(m) = self.kind_of(name)? {
            regular(name, &m)?;
        }
        let io = |what, source| crate::path_io::PathIoError {
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

fn regular(name: &str, m: &Metadata) -> Result<(), StoreError> {
    if m.file_type().is_symlink() {
        Err(StoreError::Link(name.to_string()))
    } else if !m.is_file() {
        Err(StoreError::NotRegular(name.to_string()))
    } else {
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

    #[test]
    fn links_and_fifos_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("edit");
        std::fs::create_dir(&dir).expect("mkdir");
        let outside = d.path().join("secret.yaml");
        std::fs::write(&outside, "secret: 1\n").expect("outside");
        std::os::unix::fs::symlink(&outside, dir.join("out.yaml")).expect("link");
        std::fs::write(dir.join("in.yaml"), "vms: []\n").expect("in");
        std::os::unix::fs::symlink("in.yaml", dir.join("alias.yaml")).expect("link");
        std::fs::create_dir(dir.join("sub.yaml")).expect("mkdir");
        let s = Store::new(dir.clone());
        for n in ["out.yaml", "alias.yaml"] {
            assert!(matches!(s.read(n), Err(StoreError::Link(_))), "{n}");
            assert!(
                matches!(s.write(n, "x: 1\n"), Err(StoreError::Link(_))),
                "{n}"
            );
            assert!(
                matches!(s.manifest_file(n), Err(StoreError::Link(_))),
                "{n}"
            );
            assert!(std::fs::symlink_metadata(dir.join(n))
                .expect("still there")
                .file_type()
                .is_symlink());
        }
        assert_eq!(
            std::fs::read_to_string(&outside).expect("read"),
            "secret: 1\n"
        );
        assert!(matches!(s.read("sub.yaml"), Err(StoreError::NotRegular(_))));
        assert!(matches!(
            s.write("sub.yaml", ""),
            Err(StoreError::NotRegular(_))
        ));
        assert!(matches!(
            s.manifest_file("no.yaml"),
            Err(StoreError::Missing(_))
        ));
        assert_eq!(
            s.manifest_file("in.yaml").expect("file"),
            dir.join("in.yaml")
        );
        assert_eq!(s.list().expect("list"), vec!["in.yaml".to_string()]);
    }
}
