//! A build's log files, for the page to show and download: each VM's step log
//! (`<vm>.log`) and serial log, boot-command screenshots (`<vm>-boot-NN.png`) and the event
//! log (`events.jsonl`). Names come from requests: only a plain file directly inside the
//! build's log folder is served; a name with a path in it, a dot file or a symbolic link is
//! refused.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::build_logs::EVENTS_FILE;

/// Longest file name accepted.
const MAX_NAME: usize = 200;
/// Files listed at most (a build writes a few per VM).
const MAX_FILES: usize = 500;
/// A client that reads nothing for this long is dropped, freeing its worker.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("{0:?} is not a log file name: only letters, digits, `.`, `-` and `_`, not starting with `.`")]
    BadName(String),
    #[error("build {0} has no log files (yet)")]
    NoFolder(u64),
    #[error("no log file {0:?}")]
    Missing(String),
    #[error("{0:?} is a link, not a log file")]
    Link(String),
    #[error("{0:?} is not a plain file")]
    NotRegular(String),
    #[error("cannot read {name:?}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl LogFileError {
    pub fn status(&self) -> u16 {
        match self {
            LogFileError::BadName(_) => 400,
            LogFileError::NoFolder(_) | LogFileError::Missing(_) => 404,
            LogFileError::Link(_) => 403,
            LogFileError::NotRegular(_) => 400,
            LogFileError::Io { .. } => 500,
        }
    }
}

/// Where a build's log files are now.
#[derive(Debug, Clone)]
pub struct LogFolder {
    pub dir: PathBuf,
    /// The event log while the build runs: it is filed into `dir` only at the end.
    pub events: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LogFile {
    pub name: String,
    pub size: u64,
}

/// Whether `name` may name a log file: one path component of plain characters.
pub fn check_name(name: &str) -> Result<(), LogFileError> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if name.is_empty() || name.len() > MAX_NAME || name.starts_with('.') || !plain {
        return Err(LogFileError::BadName(name.into()));
    }
    Ok(())
}

impl LogFolder {
    fn path_of(&self, name: &str) -> PathBuf {
        match &self.events {
            Some(e) if name == EVENTS_FILE => e.clone(),
            _ => self.dir.join(name),
        }
    }

    /// The plain files of the folder, by name; nothing if it is not there (yet).
    pub fn list(&self) -> Vec<LogFile> {
        let mut out: Vec<LogFile> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                check_name(&name).ok()?;
                // `DirEntry::metadata` does not follow links: a link is not listed.
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some(LogFile {
                    name,
                    size: m.len(),
                })
            })
            .take(MAX_FILES)
            .collect();
        if let Some(m) = self.events.as_ref().and_then(|e| std::fs::metadata(e).ok()) {
            if !out.iter().any(|f| f.name == EVENTS_FILE) {
                out.push(LogFile {
                    name: EVENTS_FILE.into(),
                    size: m.len(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Opens log file `name` for reading, with its length.
    pub fn open(&self, name: &str) -> Result<(File, u64), LogFileError> {
        check_name(name)?;
        let path = self.path_of(name);
        // O_NOFOLLOW: a link in the folder, wherever it points, is refused, and the name
        // holds no `/`, so nothing outside the folder can be reached.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match (e.kind(), e.raw_os_error()) {
                (std::io::ErrorKind::NotFound, _) => LogFileError::Missing(name.into()),
                (_, Some(libc::ELOOP)) => LogFileError::Link(name.into()),
                _ => LogFileError::Io {
                    name: name.into(),
                    source: e,
                },
            })?;
        let meta = file.metadata().map_err(|source| LogFileError::Io {
            name: name.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(LogFileError::NotRegular(name.into()));
        }
        Ok((file, meta.len()))
    }
}

fn content_type(name: &str) -> &'static str {
    match Path::new(name).extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        // Logs are shown as text whatever they hold, never rendered as a page.
        _ => "text/plain; charset=utf-8",
    }
}

/// Sends `len` bytes of `file` as `name`: to be saved (`download`) or shown in the page.
/// Written in pieces, so a large serial log is never held in memory.
pub fn send(
    req: super::super::http::Request,
    mut file: File,
    len: u64,
    name: &str,
    download: bool,
) {
    let disposition = if download { "attachment" } else { "inline" };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\n\
         Content-Disposition: {disposition}; filename=\"{name}\"\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; sandbox\r\n\
         Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n",
        content_type(name)
    );
    let mut w = req.into_stream();
    if w.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() || w.write_all(head.as_bytes()).is_err() {
        return;
    }
    // The length sent is the length when opened: a log still growing is cut there.
    let mut left = len;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = buf.len().min(left as usize);
        match file.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
    }
    let _ = w.flush();
    let _ = w.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, LogFolder) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("web.log"), "step output\n").unwrap();
        std::fs::write(dir.join("web-boot-01.png"), b"\x89PNG").unwrap();
        std::fs::write(t.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), dir.join("out.log")).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("rel.log")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        (t, LogFolder { dir, events: None })
    }

    #[test]
    fn names_with_paths_are_refused() {
        let (t, f) = folder();
        let abs = t.path().join("secret").display().to_string();
        for bad in [
            "..",
            ".",
            "../secret",
            "sub/../../secret",
            abs.as_str(),
            "/etc/passwd",
            ".hidden",
            "",
            "a\0b",
            "web.log%2f",
            "a b",
        ] {
            let e = f.open(bad).unwrap_err();
            assert!(matches!(e, LogFileError::BadName(_)), "{bad:?}: {e}");
            assert_eq!(e.status(), 400);
        }
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
    }

    #[test]
    fn links_out_are_refused_and_plain_files_served() {
        let (_t, f) = folder();
        for link in ["out.log", "rel.log"] {
            let e = f.open(link).unwrap_err();
            assert!(matches!(e, LogFileError::Link(_)), "{link}: {e}");
            assert_eq!(e.status(), 403);
        }
        let e = f.open("nothing.log").unwrap_err();
        assert!(matches!(e, LogFileError::Missing(_)), "{e}");
        assert_eq!(e.status(), 404);
        assert!(matches!(
            f.open("sub").unwrap_err(),
            LogFileError::NotRegular(_)
        ));
        let (mut file, len) = f.open("web.log").unwrap();
        let mut s = String::new();
        file.read_to_string(&mut s).unwrap();
        assert_eq!((s.as_str(), len), ("step output\n", 12));
        // Links and folders are not listed either.
        let names: Vec<String> = f.list().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["web-boot-01.png", "web.log"]);
        assert_eq!(content_type("web-boot-01.png"), "image/png");
        assert_eq!(content_type("web.log"), "text/plain; charset=utf-8");
    }

    #[test]
    fn a_running_builds_event_log_is_listed_from_where_it_is() {
        let (t, mut f) = folder();
        let ev = t.path().join(".m.events-1.jsonl");
        std::fs::write(&ev, "{}\n").unwrap();
        f.events = Some(ev);
        assert!(f
            .list()
            .iter()
            .any(|l| l.name == EVENTS_FILE && l.size == 3));
        assert_eq!(f.open(EVENTS_FILE).unwrap().1, 3);
        // A folder not made yet lists nothing and serves nothing.
        let none = LogFolder {
            dir: t.path().join("nope"),
            events: None,
        };
        assert!(none.list().is_empty());
        assert!(matches!(
            none.open("web.log").unwrap_err(),
            LogFileError::Missing(_)
        ));
    }
}
