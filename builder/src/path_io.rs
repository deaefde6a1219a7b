//! An I/O error with what kiln was doing and the file it was doing it to: the one shape the
//! builder's error enums give a failed file operation (each wraps it as its `Io` variant).

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct PathIoError {
    /// What was being done, as a verb: "reading", "creating", ...
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    pub fn new(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        PathIoError {
            what,
            path: path.into(),
            source,
        }
    }

    /// For `map_err`: `fs::read(p).map_err(PathIoError::at("reading", p))?`, converted into
    /// the caller's error by its `From`.
    pub fn at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| PathIoError::new(what, path, source)
    }
}
