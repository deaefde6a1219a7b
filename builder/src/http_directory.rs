//! `httpDirectory`: named `files` served over HTTP to the build's VMs, at their subnet's
//! gateway (kiln-net's gateway service; the server itself listens on the host's loopback).
//!
//! Steps learn where through their environment, under kiln's names and the ones Packer's
//! shell provisioner sets, so scripts written for Packer work unchanged:
//! `KILN_HTTP_ADDR` / `PACKER_HTTP_ADDR` (`ip:port`), `KILN_HTTP_IP` / `PACKER_HTTP_IP`,
//! `KILN_HTTP_PORT` / `PACKER_HTTP_PORT`. A step's own `env` wins over these.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::job::{FileContent, Step, StepKind};
use crate::sources::url::FileFetchError;

/// The gateway port the files are served on (RudderVirt serves on 8080; kiln's network
/// is private to the build, so a fixed one makes logs and scripts predictable).
pub const PORT: u16 = 8080;

#[derive(Debug, thiserror::Error)]
pub enum HttpDirError {
    #[error("httpDirectory: `{0}` is not a plain file name (it is served as /<name>)")]
    BadName(String),
    #[error("httpDirectory: `{0}` is not in `files`")]
    NoFile(String),
    #[error("httpDirectory: fetching `{name}`: {source}")]
    Fetch {
        name: String,
        #[source]
        source: FileFetchError,
    },
    #[error("httpDirectory: writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("httpDirectory: starting the server: {0}")]
    Serve(String),
}

/// Writes the named files into `dir` (created) and serves it on the build network at
/// [`PORT`] of every gateway.
pub fn serve(
    net: &kiln_net::Network,
    names: &[String],
    files: &BTreeMap<String, FileContent>,
    dir: &Path,
    fetch_url: &dyn Fn(&str) -> Result<Vec<u8>, FileFetchError>,
) -> Result<(), HttpDirError> {
    write_files(names, files, dir, fetch_url)?;
    net.http_dir(dir, PORT)
        .map_err(|e| HttpDirError::Serve(e.to_string()))
}

/// Writes the named `files` into `dir`, each as `dir/<name>`.
pub fn write_files(
    names: &[String],
    files: &BTreeMap<String, FileContent>,
    dir: &Path,
    fetch_url: &dyn Fn(&str) -> Result<Vec<u8>, FileFetchError>,
) -> Result<(), HttpDirError> {
    std::fs::create_dir_all(dir).map_err(|source| HttpDirError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for name in names {
        if !plain_name(name) {
            return Err(HttpDirError::BadName(name.clone()));
        }
        let data = match files.get(name) {
            None => return Err(HttpDirError::NoFile(name.clone())),
            Some(FileContent::Inline(s)) => s.clone().into_bytes(),
            Some(FileContent::Url(u)) => fetch_url(u).map_err(|source| HttpDirError::Fetch {
                name: name.clone(),
                source,
            })?,
            Some(FileContent::Cached { path, .. }) => {
                std::fs::read(path).map_err(|source| HttpDirError::Fetch {
                    name: name.clone(),
                    source: FileFetchError::ReadFile {
                        path: path.clone(),
                        source,
                    },
                })?
            }
        };
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.part"));
        std::fs::write(&tmp, &data)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| HttpDirError::Write { path, source })?;
    }
    Ok(())
}

/// A name the server can serve as `/<name>`: one path component, not hidden.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0', '?', '#', '%'])
        && !name.chars().any(char::is_control)
}

/// The environment that tells a step where the files are.
pub fn step_env(gateway: Ipv4Addr) -> BTreeMap<String, String> {
    let addr = format!("{gateway}:{PORT}");
    let mut env = BTreeMap::new();
    for prefix in ["KILN", "PACKER"] {
        env.insert(format!("{prefix}_HTTP_ADDR"), addr.clone());
        env.insert(format!("{prefix}_HTTP_IP"), gateway.to_string());
        env.insert(format!("{prefix}_HTTP_PORT"), PORT.to_string());
    }
    env
}

/// `steps` with `env` added to every shell step (a step's own variables win).
pub fn with_env(steps: &[Step], env: &BTreeMap<String, String>) -> Vec<Step> {
    steps
        .iter()
        .cloned()
        .map(|mut s| {
            if let StepKind::Shell { env: own, .. } = &mut s.kind {
                for (k, v) in env {
                    own.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> BTreeMap<String, FileContent> {
        [
            (
                "preseed.cfg".to_string(),
                FileContent::Inline("d-i x\n".into()),
            ),
            (
                "remote.txt".to_string(),
                FileContent::Url("http://127.0.0.1:1/remote.txt".into()),
            ),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn files_are_written_by_name_and_urls_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("http");
        let fetch = |u: &str| {
            assert_eq!(u, "http://127.0.0.1:1/remote.txt");
            Ok(b"fetched".to_vec())
        };
        write_files(
            &["preseed.cfg".into(), "remote.txt".into()],
            &files(),
            &out,
            &fetch,
        )
        .unwrap();
        assert_eq!(std::fs::read(out.join("preseed.cfg")).unwrap(), b"d-i x\n");
        assert_eq!(std::fs::read(out.join("remote.txt")).unwrap(), b"fetched");
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(names.len(), 2, "no temporary file is left");
    }

    #[test]
    fn bad_names_missing_files_and_failed_fetches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let fetch = |url: &str| {
            Err(crate::sources::url::DownloadError::Transfer {
                url: url.into(),
                reason: "offline".into(),
            }
            .into())
        };
        for bad in ["../etc/passwd", "a/b", ".hidden", ""] {
            let e = write_files(&[bad.into()], &files(), dir.path(), &fetch).unwrap_err();
            assert!(matches!(e, HttpDirError::BadName(_)), "{bad}: {e}");
        }
        let e = write_files(&["nope".into()], &files(), dir.path(), &fetch).unwrap_err();
        assert!(e.to_string().contains("`nope` is not in `files`"), "{e}");
        let e = write_files(&["remote.txt".into()], &files(), dir.path(), &fetch).unwrap_err();
        assert!(e.to_string().contains("offline"), "{e}");
    }

    #[test]
    fn shell_steps_get_the_address_and_keep_their_own_env() {
        let env = step_env(Ipv4Addr::new(10, 0, 2, 1));
        assert_eq!(env["KILN_HTTP_ADDR"], "10.0.2.1:8080");
        assert_eq!(env["PACKER_HTTP_ADDR"], "10.0.2.1:8080");
        assert_eq!(env["PACKER_HTTP_IP"], "10.0.2.1");
        assert_eq!(env["KILN_HTTP_PORT"], "8080");
        let steps = vec![
            Step {
                name: "s".into(),
                timeout: None,
                cache: true,
                kind: StepKind::Shell {
                    inline: "true".into(),
                    env: [("KILN_HTTP_PORT".to_string(), "mine".to_string())]
                        .into_iter()
                        .collect(),
                    execute_command: None,
                },
            },
            Step {
                name: "r".into(),
                timeout: None,
                cache: true,
                kind: StepKind::Reboot { command: None },
            },
        ];
        let out = with_env(&steps, &env);
        let StepKind::Shell { env: got, .. } = &out[0].kind else {
            panic!("shell step expected")
        };
        assert_eq!(got["KILN_HTTP_PORT"], "mine");
        assert_eq!(got["KILN_HTTP_ADDR"], "10.0.2.1:8080");
        assert!(matches!(out[1].kind, StepKind::Reboot { .. }));
    }
}
