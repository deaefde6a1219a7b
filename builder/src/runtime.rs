//! The runtime folder: the sockets of running builds (`<root>/<pid>/`) and clones
//! (`<root>/clones/<clone>/`), which `kiln exec`, `kiln shell` and `kiln resume` connect to.
//!
//! It is per user, so no other local user can plant sockets there: `$KILN_RUN_DIR`, else
//! `$XDG_RUNTIME_DIR/kiln`, else `/run/kiln` for root, else `<tmp>/kiln-<uid>`. kiln makes it
//! 0700 and, on every use, refuses one that is a symbolic link, not owned by the current user,
//! or reachable by group or others.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Overrides the runtime folder (tests, `kiln serve`'s builds); checked like the default.
pub const ENV: &str = "KILN_RUN_DIR";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("creating the runtime folder {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checking the runtime folder {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the runtime folder {path} is a symbolic link: kiln keeps its sockets only in a real \
         folder of yours; remove the link, or set {ENV} to a folder you own"
    )]
    Symlink { path: PathBuf },
    #[error(
        "the runtime folder {path} is not a folder; remove it, or set {ENV} to a folder you own"
    )]
    NotDir { path: PathBuf },
    #[error(
        "the runtime folder {path} belongs to uid {owner}, not to you (uid {uid}): its owner \
         could answer for kiln's sockets; remove it, or set {ENV} to a folder you own"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the runtime folder {path} has mode {mode:04o}: other users could reach kiln's sockets; \
         run `chmod 700 {path}` or remove it"
    )]
    Mode { path: PathBuf, mode: u32 },
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Where the runtime folder is when `KILN_RUN_DIR` is not set.
pub fn default_root(xdg_runtime_dir: Option<OsString>, uid: u32, tmp: &Path) -> PathBuf {
    match xdg_runtime_dir.filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("kiln"),
        None if uid == 0 => PathBuf::from("/run/kiln"),
        // Short on purpose: socket paths under it are limited to 108 bytes.
        None => tmp.join(format!("kiln-{uid}")),
    }
}

/// The runtime folder, made if missing and checked (see the module's documentation).
pub fn root() -> Result<PathBuf, RuntimeDirError> {
    let uid = euid();
    let path = match std::env::var_os(ENV).filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => default_root(
            std::env::var_os("XDG_RUNTIME_DIR"),
            uid,
            &std::env::temp_dir(),
        ),
    };
    ensure(&path, uid)?;
    Ok(path)
}

/// Makes `path` (0700) if it is missing, then checks it is a real folder owned by `uid` that
/// group and others cannot reach.
pub fn ensure(path: &Path, uid: u32) -> Result<(), RuntimeDirError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| RuntimeDirError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                // Someone made it meanwhile: the checks below decide.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(RuntimeDirError::Create {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
            std::fs::symlink_metadata(path).map_err(|source| RuntimeDirError::Stat {
                path: path.to_path_buf(),
                source,
            })?
        }
        Err(source) => {
            return Err(RuntimeDirError::Stat {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let path = path.to_path_buf();
    if meta.file_type().is_symlink() {
        return Err(RuntimeDirError::Symlink { path });
    }
    if !meta.is_dir() {
        return Err(RuntimeDirError::NotDir { path });
    }
    if meta.uid() != uid {
        return Err(RuntimeDirError::Owner {
            path,
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RuntimeDirError::Mode { path, mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn default_follows_xdg_then_root_then_a_per_uid_tmp_folder() {
        let tmp = Path::new("/tmp");
        assert_eq!(
            default_root(Some("/run/user/1000".into()), 1000, tmp),
            Path::new("/run/user/1000/kiln")
        );
        assert_eq!(
            default_root(Some("/run/user/0".into()), 0, tmp),
            Path::new("/run/user/0/kiln")
        );
        assert_eq!(default_root(None, 0, tmp), Path::new("/run/kiln"));
        assert_eq!(
            default_root(Some("".into()), 0, tmp),
            Path::new("/run/kiln")
        );
        assert_eq!(default_root(None, 1000, tmp), Path::new("/tmp/kiln-1000"));
        // Never the old shared folder.
        assert_ne!(default_root(None, 1000, tmp), Path::new("/tmp/kiln-run"));
    }

    #[test]
    fn a_missing_folder_is_made_0700_and_then_accepted() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a/run");
        ensure(&p, euid()).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o700);
        ensure(&p, euid()).unwrap();
    }

    #[test]
    fn a_folder_open_to_others_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure(&p, euid()).unwrap_err();
        assert!(
            matches!(e, RuntimeDirError::Mode { mode: 0o777, .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains("0777"),
            "{msg}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(matches!(
            ensure(&p, euid()),
            Err(RuntimeDirError::Mode { mode: 0o750, .. })
        ));
    }

    #[test]
    fn a_symlink_is_refused_even_to_a_good_folder() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        ensure(&real, euid()).unwrap();
        let link = t.path().join("run");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure(&link, euid()).unwrap_err();
        assert!(matches!(e, RuntimeDirError::Symlink { .. }), "{e}");
        // A dangling link is not followed to make a folder either.
        let dangling = t.path().join("dangling");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            ensure(&dangling, euid()),
            Err(RuntimeDirError::Symlink { .. })
        ));
        assert!(!t.path().join("nowhere").exists());
    }

    #[test]
    fn a_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            ensure(&p, euid()),
            Err(RuntimeDirError::NotDir { .. })
        ));
    }

    #[test]
    fn a_folder_of_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("run");
        ensure(&p, euid()).unwrap();
        if euid() == 0 {
            // Give it away, as a local user who made it first would own it.
            std::os::unix::fs::chown(&p, Some(4242), Some(4242)).unwrap();
            let e = ensure(&p, 0).unwrap_err();
            assert!(
                matches!(
                    e,
                    RuntimeDirError::Owner {
                        owner: 4242,
                        uid: 0,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("uid 4242"), "{e}");
        } else {
            // Without root, check against another uid instead.
            let e = ensure(&p, euid() + 1).unwrap_err();
            assert!(matches!(e, RuntimeDirError::Owner { .. }), "{e}");
        }
    }
}
