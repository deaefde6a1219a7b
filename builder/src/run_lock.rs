//! The lock that keeps a clone to one `kiln run` at a time: an exclusive `flock` on
//! `<clone>/.run.lock`, held for the run's life. The kernel releases it when the run ends,
//! however it ends (even SIGKILL), so a killed run never leaves the clone locked. The file
//! holds the running process's pid, for the refusal's message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".run.lock";

#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    #[error("clone `{clone}` is already running (kiln run{}; its lock is {path})",
        pid.map(|p| format!(", pid {p}")).unwrap_or_default())]
    Running {
        clone: String,
        pid: Option<u32>,
        path: PathBuf,
    },
    #[error("locking {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while a clone runs.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Takes clone `clone`'s run lock in its folder `dir`, or says which process holds it.
pub fn acquire(dir: &Path, clone: &str) -> Result<RunLock, RunLockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| RunLockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(RunLockError::Running {
                clone: clone.into(),
                pid: text.trim().parse().ok(),
                path,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(RunLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_second_run_is_refused_with_the_holders_pid_until_the_first_ends() {
        let t = tempfile::tempdir().unwrap();
        let first = acquire(t.path(), "web-1").unwrap();
        let e = acquire(t.path(), "web-1").unwrap_err();
        match &e {
            RunLockError::Running { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("already running"), "{e}");
        drop(first);
        acquire(t.path(), "web-1").unwrap();
    }

    #[test]
    fn a_killed_holder_leaves_no_lock() {
        if Command::new("flock").arg("--version").output().is_err() {
            eprintln!("SKIP: flock(1) is not installed");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        // A process holding the lock the way `kiln run` does (flock(1) on the same file, in
        // a shell that then becomes the sleep, so killing the child ends the holder).
        let lock = t.path().join(LOCK_FILE);
        let mut child = Command::new("sh")
            .args(["-c", "exec 9>>\"$1\" && flock -x 9 && exec sleep 600", "sh"])
            .arg(&lock)
            .spawn()
            .unwrap();
        // Until the child holds it.
        let t0 = Instant::now();
        while acquire(t.path(), "web-1").is_ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "flock never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(matches!(
            acquire(t.path(), "web-1"),
            Err(RunLockError::Running { .. })
        ));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        acquire(t.path(), "web-1").unwrap();
    }
}
