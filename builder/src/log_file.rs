//! Log files: the event log, step output and serial consoles may hold secrets, so they are
//! created readable by their owner only, with the mode set at creation (never a chmod after).
//! Low in the crate so that the event sinks and the build both use it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Log files are for their owner only.
pub const LOG_MODE: u32 = 0o600;

/// Creates (or truncates) a log file, 0600 from the start.
pub fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(LOG_MODE)
        .open(path)
}

/// Opens a log file to append to, making it 0600 if missing. One an older kiln made readable
/// by others is narrowed too.
pub fn append(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_MODE)
        .open(path)?;
    let perm = f.metadata()?.permissions();
    if perm.mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(LOG_MODE))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn logs_are_made_for_their_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.log");
        create(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let q = t.path().join("b.log");
        append(&q).unwrap();
        assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o777, 0o600);
        // One an older kiln left readable by all is narrowed on the next append.
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o644)).unwrap();
        append(&q).unwrap();
        assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o777, 0o600);
    }
}
