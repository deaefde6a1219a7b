//! Errors of the disk operations (open, create, convert, check...).

use std::path::PathBuf;

use crate::BlockError;

/// An error from a kiln-disk operation; each variant names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt or unsupported qcow2 image: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: backing chain loops back to {again}")]
    BackingLoop { path: PathBuf, again: PathBuf },
    #[error("{path}: backing chain deeper than {max} images")]
    ChainTooDeep { path: PathBuf, max: usize },
    #[error("{path}: backing format {format:?} is not supported (raw or qcow2)")]
    BackingFormat { path: PathBuf, format: String },
    #[error(
        "{image}: refusing its backing file {name:?}: {why}; name the backing file \
         explicitly to read it (`kiln disk ... --allow-backing FILE`), or flatten the image \
         with `kiln disk convert --allow-backing FILE` and use the result"
    )]
    BackingRefused {
        image: PathBuf,
        /// The backing name exactly as the image writes it.
        name: String,
        why: String,
    },
    #[error("{top}: a thin capture needs an overlay over {parent}")]
    NotOverParent { top: PathBuf, parent: PathBuf },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Block { path: PathBuf, source: BlockError },
    #[error("block device: {0}")]
    Device(#[from] BlockError),
}

pub type Result<T> = std::result::Result<T, DiskError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.into();
    move |source| DiskError::Io { path, source }
}

pub(crate) fn block_err(path: impl Into<PathBuf>) -> impl FnOnce(BlockError) -> DiskError {
    let path = path.into();
    move |source| DiskError::Block { path, source }
}

pub(crate) fn corrupt(path: impl Into<PathBuf>) -> impl FnOnce(String) -> DiskError {
    let path = path.into();
    move |what| DiskError::Corrupt { path, what }
}
