//! The cache folder (bases, images, layers: it grows) and the runtime folder (sockets).

use std::path::Path;

use super::{Finding, Status};
use crate::cache::{human_size, Cache};

/// Below this much free space where the cache is, a bootstrap base and a module's disks may
/// not fit.
const LOW_FREE: u64 = 10 << 30;

pub fn cache() -> Finding {
    let cache = match Cache::from_env() {
        Ok(c) => c,
        Err(e) => {
            return Finding::bad(
                "cache",
                Status::Fail,
                format!("the cache folder cannot be used: {e}"),
                "set KILN_CACHE to a folder you can write, on a disk with room",
            )
        }
    };
    let root = cache.root().display().to_string();
    // A build stages every download and base in tmp/ before it is renamed into place.
    if let Err(e) = cache.temp_dir("doctor-") {
        return Finding::bad(
            "cache",
            Status::Fail,
            format!("{root}: cannot write into it: {e}"),
            "fix its permissions, or set KILN_CACHE to a folder you can write",
        );
    }
    let size: u64 = cache
        .entries()
        .map(|es| es.iter().map(|e| e.size).sum())
        .unwrap_or(0);
    let Some(free) = free_bytes(cache.root()) else {
        return Finding::ok("cache", format!("{root}: {} held", human_size(size)));
    };
    let found = format!(
        "{root}: {} held, {} free on its disk",
        human_size(size),
        human_size(free)
    );
    if free < LOW_FREE {
        Finding::bad(
            "cache",
            Status::Warn,
            found,
            format!(
                "free space below {}: `kiln cache prune --older-than 30d` (or --max-size), \
                 remove old modules with `kiln rm`, or set KILN_CACHE to a larger disk",
                human_size(LOW_FREE)
            ),
        )
    } else {
        Finding::ok("cache", found)
    }
}

pub fn runtime() -> Finding {
    match crate::runtime::root() {
        Ok(p) => Finding::ok(
            "runtime folder",
            format!("{} (yours, mode 0700)", p.display()),
        ),
        // Its error already names the path and the fix.
        Err(e) => Finding::bad(
            "runtime folder",
            Status::Fail,
            e.to_string(),
            format!("set {} to a folder only you can reach", crate::runtime::ENV),
        ),
    }
}

/// Bytes free to an unprivileged user on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes the struct it is given; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are valid for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_reported_for_a_real_folder_only() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_bytes(tmp.path()).is_some_and(|b| b > 0));
        assert_eq!(free_bytes(&tmp.path().join("missing")), None);
    }
}
