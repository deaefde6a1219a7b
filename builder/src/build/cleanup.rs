//! What an attempt leaves behind when it ends: its runtime folder is removed, and a failed
//! attempt's logs are moved out of the partial module before that is removed.

use crate::path_io::PathIoError;
use std::fs;
use std::path::{Path, PathBuf};

use super::error::BuildError;
use super::options::runtime_root;
use crate::leftovers::OwnerLock;

/// This process's runtime folder (sockets, the handbuild resume flags), locked while the
/// build runs and removed when it ends.
pub(super) struct RunDir {
    path: PathBuf,
    // Released before the folder is removed: fields drop in this order.
    _lock: OwnerLock,
    _remove: RemoveOnDrop,
}

impl RunDir {
    pub(super) fn create() -> Result<Self, BuildError> {
        let path = runtime_root()?.join(std::process::id().to_string());
        fs::create_dir_all(&path).map_err(PathIoError::at("creating", &path))?;
        let remove = RemoveOnDrop(path.clone());
        // Proves to other kiln processes' start-up clean-up that this folder is in use.
        let lock = OwnerLock::hold(&path).map_err(PathIoError::at("locking", &path))?;
        Ok(RunDir {
            path,
            _lock: lock,
            _remove: remove,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Moves a failed attempt's logs out of the partial module before it is removed.
pub(super) struct KeepLogsOnFailure {
    pub from: PathBuf,
    pub to: Option<PathBuf>,
}

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if let Some(to) = &self.to {
            if let Err(e) = crate::build_logs::keep(&self.from, to) {
                tracing::warn!(
                    "keeping the logs of the failed build in {}: {e}",
                    to.display()
                );
            }
        }
    }
}
