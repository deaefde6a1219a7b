//! The static guest agent kiln puts into guests, and its digest (part of bootstrap and step
//! cache keys). In order:
//! 1. `$KILN_AGENT_BIN` (tests and agent developers);
//! 2. the copy embedded in kiln at build time (builder/build.rs), written out to
//!    `<cache>/agent/<sha256>/kiln-agent` so guests get it from a file like any other;
//! 3. a static `kiln-agent` beside kiln (or `../agent/kiln-agent`), for a kiln built with no
//!    agent embedded.
//!
//! Every user asks [`locate`], so all of them see the same bytes and digest.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::cache::{sha256_bytes, sha256_file, Cache, CacheError};

/// The agent kiln was built with (builder/build.rs).
pub static EMBEDDED: &[u8] = include_bytes!(env!("KILN_EMBEDDED_AGENT"));

/// The cache's folder of written-out agents.
pub const CACHE_DIR: &str = "agent";
const FILE_NAME: &str = "kiln-agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    #[error("KILN_AGENT_BIN is {0}, which is not a file")]
    EnvNotFile(PathBuf),
    #[error("reading the agent binary {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing kiln's embedded agent to {path}: {source}")]
    WriteOut {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent written to {path} has digest {got}, not {want}")]
    Digest {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error(
        "no guest agent: kiln was built without one embedded, KILN_AGENT_BIN is not set and no \
         static kiln-agent is beside kiln"
    )]
    NotFound,
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Where the agent came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Env,
    Embedded,
    BesideKiln,
}

/// The agent binary on the host and the SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub sha256: String,
    pub origin: Origin,
}

/// The digest of [`EMBEDDED`], worked out once.
pub fn embedded_sha256() -> &'static str {
    static D: OnceLock<String> = OnceLock::new();
    D.get_or_init(|| sha256_bytes(EMBEDDED))
}

/// The agent for this process: `$KILN_AGENT_BIN`, else the embedded one written out to the
/// cache (`$KILN_CACHE`, as builds use).
pub fn locate() -> Result<AgentBinary, AgentBinaryError> {
    if let Some(p) = std::env::var_os("KILN_AGENT_BIN") {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(AgentBinaryError::EnvNotFile(path));
        }
        let sha256 = digest(&path)?;
        return Ok(AgentBinary {
            path,
            sha256,
            origin: Origin::Env,
        });
    }
    if !EMBEDDED.is_empty() {
        let root = Cache::root_from_env()?;
        let path = write_out(&root, EMBEDDED, embedded_sha256())?;
        return Ok(AgentBinary {
            path,
            sha256: embedded_sha256().to_string(),
            origin: Origin::Embedded,
        });
    }
    // A kiln built with an empty KILN_EMBED_AGENT file (a quick developer build).
    let path = kiln_agent::locate_binary().ok_or(AgentBinaryError::NotFound)?;
    let sha256 = digest(&path)?;
    Ok(AgentBinary {
        path,
        sha256,
        origin: Origin::BesideKiln,
    })
}

fn digest(path: &Path) -> Result<String, AgentBinaryError> {
    sha256_file(path).map_err(|source| AgentBinaryError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Where [`write_out`] puts an agent with this digest.
pub fn cached_path(cache_root: &Path, sha256: &str) -> PathBuf {
    cache_root.join(CACHE_DIR).join(sha256).join(FILE_NAME)
}

/// `bytes` (whose digest is `sha256`) as `<cache_root>/agent/<sha256>/kiln-agent`, mode 0755.
/// A file already there is trusted only when its digest matches; anything else is replaced.
/// Written to a temporary name, synced, then renamed, so concurrent writers (builds in
/// parallel) each leave a whole file and readers never see a partial one.
pub fn write_out(
    cache_root: &Path,
    bytes: &[u8],
    sha256: &str,
) -> Result<PathBuf, AgentBinaryError> {
    let path = cached_path(cache_root, sha256);
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentBinaryError::WriteOut { path, source }
    };
    if sha256_file(&path).is_ok_and(|d| d == sha256) {
        let meta = fs::metadata(&path).map_err(write_err(&path))?;
        if meta.permissions().mode() & 0o777 != 0o755 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .map_err(write_err(&path))?;
        }
        return Ok(path);
    }
    let dir = path.parent().expect("cached_path has a parent");
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-agent-")
        .tempfile_in(dir)
        .map_err(write_err(dir))?;
    tmp.write_all(bytes).map_err(write_err(tmp.path()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(write_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(write_err(tmp.path()))?;
    tmp.persist(&path).map_err(|e| AgentBinaryError::WriteOut {
        path: path.clone(),
        source: e.error,
    })?;
    // The rename reaches the disk too: a crash must not leave the name with no bytes.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let got = digest(&path)?;
    if got != sha256 {
        return Err(AgentBinaryError::Digest {
            path,
            got,
            want: sha256.to_string(),
        });
    }
    tracing::debug!(path = %path.display(), "wrote kiln's embedded agent");
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_a_static_binary() {
        let d = tempfile::tempdir().unwrap();
        let p = write_out(d.path(), EMBEDDED, embedded_sha256()).unwrap();
        assert!(kiln_agent::is_static_elf(&p), "{p:?}");
    }

    #[test]
    fn write_out_names_the_file_by_digest_with_mode_0755() {
        let d = tempfile::tempdir().unwrap();
        let bytes = b"agent bytes";
        let sha = sha256_bytes(bytes);
        let p = write_out(d.path(), bytes, &sha).unwrap();
        assert_eq!(p, d.path().join("agent").join(&sha).join("kiln-agent"));
        assert_eq!(fs::read(&p).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Again: the same file, nothing else left in the folder.
        assert_eq!(write_out(d.path(), bytes, &sha).unwrap(), p);
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_corrupted_or_truncated_file_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let bytes = b"the real agent";
        let sha = sha256_bytes(bytes);
        let p = cached_path(d.path(), &sha);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        for bad in [&b"the real agenT"[..], b"the real", b""] {
            fs::write(&p, bad).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(write_out(d.path(), bytes, &sha).unwrap(), p);
            assert_eq!(fs::read(&p).unwrap(), bytes);
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        // A right file with the wrong mode keeps its bytes and gets its mode back.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        write_out(d.path(), bytes, &sha).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn concurrent_writers_leave_one_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let sha = sha256_bytes(&bytes);
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| write_out(d.path(), &bytes, &sha).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(paths.iter().all(|p| *p == paths[0]));
        assert_eq!(sha256_file(&paths[0]).unwrap(), sha);
        let names: Vec<_> = fs::read_dir(paths[0].parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["kiln-agent"], "temporary files left behind");
    }

    #[test]
    fn a_write_out_that_cannot_write_says_where() {
        let d = tempfile::tempdir().unwrap();
        // The cache root is a file: no folder can be made under it.
        let root = d.path().join("file");
        fs::write(&root, b"").unwrap();
        let e = write_out(&root, b"x", &sha256_bytes(b"x")).unwrap_err();
        assert!(matches!(e, AgentBinaryError::WriteOut { .. }), "{e}");
        assert!(e.to_string().contains(&*root.to_string_lossy()), "{e}");
    }
}
