//! What killed runs leave behind (partial modules, convert temporaries, runtime folders), and
//! the locks that prove a live process still owns them.
//!
//! A build, convert or run holds an exclusive `flock` on its temporary folder or file for as
//! long as it uses it ([`OwnerLock`]); the kernel drops the lock when the process dies, however
//! it dies. Start-up clean-up removes an entry only if it can take that lock itself, and, when
//! the name carries a pid, only if that process is gone (a pid alone can be reused, a lock
//! cannot be held by the dead); entries without a pid must also be older than [`GRACE`], so
//! one made an instant ago by a process that has not locked it yet is left alone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How old an unlocked entry without a pid in its name must be to count as left behind.
pub const GRACE: Duration = Duration::from_secs(60);

/// An exclusive lock on a folder or file, held until dropped (or the process ends).
#[derive(Debug)]
pub struct OwnerLock {
    _file: File,
}

impl OwnerLock {
    /// Locks `path` (it must exist), without waiting: `WouldBlock` when another holds it.
    pub fn hold(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Whether a live process holds `path`'s lock. Anything that cannot be checked counts as
/// owned: clean-up keeps what it cannot prove abandoned.
pub fn is_owned(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => !matches!(f.try_lock(), Ok(())),
        Err(_) => true,
    }
}

/// Whether process `pid` exists (in this pid namespace).
pub fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

/// What kind of leftover a folder entry is, and the pid its name carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `.<module>.partial-<pid>`: a module (or clone) being written.
    Partial(u32),
    /// `.<module>.events-<pid>.jsonl`: a build's event log before it is filed.
    Events(u32),
    /// `.kiln-convert-*`: a `kiln disk convert` output being written.
    Convert,
    /// `<pid>`: a build's runtime folder.
    BuildRun(u32),
    /// `clones/<clone>`: a clone's runtime folder (no pid: the lock decides).
    CloneRun,
}

/// Which names a sweep of one folder looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// An output (modules) or clones folder: partial folders and event logs.
    Modules,
    /// A folder `kiln disk convert` writes to.
    ConvertOutput,
    /// The runtime folder's top: builds' `<pid>` folders.
    RuntimeRoot,
    /// The runtime folder's `clones/`.
    RuntimeClones,
}

/// Names `place` may hold that are leftovers once abandoned.
pub fn classify(place: Place, name: &str) -> Option<Kind> {
    let pid_after = |s: &str, sep: &str| -> Option<u32> {
        let (_, pid) = s.rsplit_once(sep)?;
        pid.parse().ok()
    };
    match place {
        Place::Modules => {
            let rest = name.strip_prefix('.')?;
            if let Some(stem) = rest.strip_suffix(".jsonl") {
                return pid_after(stem, ".events-").map(Kind::Events);
            }
            pid_after(rest, ".partial-").map(Kind::Partial)
        }
        Place::ConvertOutput => name.starts_with(".kiln-convert-").then_some(Kind::Convert),
        Place::RuntimeRoot => name.parse().ok().map(Kind::BuildRun),
        Place::RuntimeClones => Some(Kind::CloneRun),
    }
}

/// One entry a sweep removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub path: PathBuf,
    /// The dead process it was left by, when its name says.
    pub pid: Option<u32>,
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(p) => write!(
                f,
                "removed {}, left by a kiln process that ended (pid {p})",
                self.path.display()
            ),
            None => write!(
                f,
                "removed {}, left by a kiln process that ended",
                self.path.display()
            ),
        }
    }
}

fn abandoned(path: &Path, kind: Kind, now: SystemTime) -> bool {
    let pid = match kind {
        Kind::Partial(p) | Kind::Events(p) | Kind::BuildRun(p) => Some(p),
        Kind::Convert | Kind::CloneRun => None,
    };
    if let Some(p) = pid {
        // Ours, or a live process's (perhaps a reused pid: then the entry waits a little
        // longer rather than risk a live run's files).
        if pid_alive(p) {
            return false;
        }
    } else {
        let old = std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= GRACE);
        if !old {
            return false;
        }
    }
    // Event logs are not locked (their pid decides); the rest must be free to lock.
    matches!(kind, Kind::Events(_)) || !is_owned(path)
}

/// Removes the leftovers of ended processes in `dir` (a missing folder has none), and says
/// which. Entries that are symbolic links are never followed: only the link is removed.
pub fn sweep(dir: &Path, place: Place) -> Vec<Removed> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let now = SystemTime::now();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(kind) = name.to_str().and_then(|n| classify(place, n)) else {
            continue;
        };
        let path = e.path();
        if !abandoned(&path, kind, now) {
            continue;
        }
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let r = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => {
                let pid = match kind {
                    Kind::Partial(p) | Kind::Events(p) | Kind::BuildRun(p) => Some(p),
                    Kind::Convert | Kind::CloneRun => None,
                };
                let removed = Removed { path, pid };
                tracing::info!("{removed}");
                out.push(removed);
            }
            Err(e) => tracing::warn!("cannot remove the leftover {}: {e}", path.display()),
        }
    }
    out
}

/// [`sweep`] of every folder given, each line printed as a note on stderr.
pub fn sweep_and_report(places: &[(&Path, Place)]) {
    for (dir, place) in places {
        for r in sweep(dir, *place) {
            eprintln!("note: {r}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A pid that no process has now: a child that has ended and been reaped.
    fn dead_pid() -> u32 {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_alive(pid));
        pid
    }

    fn age(path: &Path, by: Duration) {
        let f = File::open(path).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn names_are_classified() {
        use Kind::*;
        use Place::*;
        assert_eq!(classify(Modules, ".web.partial-123"), Some(Partial(123)));
        assert_eq!(classify(Modules, ".web.events-9.jsonl"), Some(Events(9)));
        assert_eq!(classify(Modules, "web"), None);
        assert_eq!(classify(Modules, ".web.partial-x"), None);
        assert_eq!(classify(Modules, ".web.old-12"), None);
        assert_eq!(classify(Modules, ".logs"), None);
        assert_eq!(classify(ConvertOutput, ".kiln-convert-aB3"), Some(Convert));
        assert_eq!(classify(ConvertOutput, "disk.qcow2"), None);
        assert_eq!(classify(RuntimeRoot, "4711"), Some(BuildRun(4711)));
        assert_eq!(classify(RuntimeRoot, "clones"), None);
        assert_eq!(classify(RuntimeClones, "web-1"), Some(CloneRun));
    }

    #[test]
    fn a_dead_processs_partial_module_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let p = t.path().join(format!(".web.partial-{dead}"));
        std::fs::create_dir_all(p.join("disks")).unwrap();
        std::fs::write(p.join("disks/root.qcow2"), b"x").unwrap();
        let ev = t.path().join(format!(".web.events-{dead}.jsonl"));
        std::fs::write(&ev, b"{}\n").unwrap();
        std::fs::create_dir(t.path().join("web")).unwrap();
        let removed = sweep(t.path(), Place::Modules);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!p.exists() && !ev.exists());
        assert!(t.path().join("web").exists());
        assert!(removed[0].to_string().contains(&dead.to_string()));
    }

    #[test]
    fn a_partial_module_whose_lock_is_held_is_kept_even_with_a_dead_pid() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join(format!(".web.partial-{}", dead_pid()));
        std::fs::create_dir(&p).unwrap();
        let lock = OwnerLock::hold(&p).unwrap();
        assert!(sweep(t.path(), Place::Modules).is_empty());
        assert!(p.exists());
        drop(lock);
        assert_eq!(sweep(t.path(), Place::Modules).len(), 1);
        assert!(!p.exists());
    }

    #[test]
    fn a_live_processs_partial_module_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let mut child = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let p = t.path().join(format!(".web.partial-{}", child.id()));
        std::fs::create_dir(&p).unwrap();
        let ours = t.path().join(format!(".db.partial-{}", std::process::id()));
        std::fs::create_dir(&ours).unwrap();
        let removed = sweep(t.path(), Place::Modules);
        let _ = child.kill();
        let _ = child.wait();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(p.exists() && ours.exists());
    }

    #[test]
    fn convert_temporaries_go_only_when_unlocked_and_old() {
        let t = tempfile::tempdir().unwrap();
        let old = t.path().join(".kiln-convert-old");
        let fresh = t.path().join(".kiln-convert-new");
        let held = t.path().join(".kiln-convert-held");
        for p in [&old, &fresh, &held] {
            std::fs::write(p, b"data").unwrap();
        }
        age(&old, GRACE * 2);
        age(&held, GRACE * 2);
        let lock = OwnerLock::hold(&held).unwrap();
        let removed = sweep(t.path(), Place::ConvertOutput);
        assert_eq!(
            removed,
            vec![Removed {
                path: old.clone(),
                pid: None
            }]
        );
        assert!(!old.exists() && fresh.exists() && held.exists());
        drop(lock);
        assert_eq!(sweep(t.path(), Place::ConvertOutput).len(), 1);
        assert!(!held.exists());
    }

    #[test]
    fn runtime_folders_of_ended_builds_and_runs_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let dead = t.path().join(dead_pid().to_string());
        let live = t.path().join(std::process::id().to_string());
        std::fs::create_dir_all(dead.join("web")).unwrap();
        std::fs::create_dir_all(live.join("web")).unwrap();
        std::fs::create_dir_all(t.path().join("clones")).unwrap();
        assert_eq!(sweep(t.path(), Place::RuntimeRoot).len(), 1);
        assert!(!dead.exists() && live.exists() && t.path().join("clones").exists());

        let clones = t.path().join("clones");
        let gone = clones.join("web-1");
        let running = clones.join("web-2");
        std::fs::create_dir_all(&gone).unwrap();
        std::fs::create_dir_all(&running).unwrap();
        age(&gone, GRACE * 2);
        age(&running, GRACE * 2);
        let _lock = OwnerLock::hold(&running).unwrap();
        assert_eq!(sweep(&clones, Place::RuntimeClones).len(), 1);
        assert!(!gone.exists() && running.exists());
    }

    #[test]
    fn a_lock_is_exclusive_and_released_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let a = OwnerLock::hold(t.path()).unwrap();
        assert!(is_owned(t.path()));
        let e = OwnerLock::hold(t.path()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(a);
        assert!(!is_owned(t.path()));
        let _b = OwnerLock::hold(t.path()).unwrap();
    }
}
