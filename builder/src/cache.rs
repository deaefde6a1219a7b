//! The content-addressed cache (`$KILN_CACHE`, else `~/.cache/kiln`).
//!
//! Layout:
//! - `blobs/sha256/<hex>`: downloaded and imported images, named by the digest of their bytes.
//! - `partial/<hex of url>`: an interrupted download, resumed with an HTTP Range request.
//! - `bootstrap/<key>/`: a bootstrapped root (disk, kernel, initrd, `meta.json`), named by the
//!   digest of its inputs (see [`crate::sources::bootstrap`]).
//! - `boot/<hex>/`: kernel and initrd extracted from an image, named by the image's digest.
//! - `tmp/`: work in progress; everything is built there and renamed into place, so a cache
//!   entry is either complete or absent.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot find a cache folder: set KILN_CACHE or HOME")]
    NoHome,
    #[error("cache folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A cache root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn from_env() -> Result<Self, CacheError> {
        if let Some(p) = std::env::var_os("KILN_CACHE").filter(|p| !p.is_empty()) {
            return Self::open(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
            return Self::open(PathBuf::from(p).join("kiln"));
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or(CacheError::NoHome)?;
        Self::open(PathBuf::from(home).join(".cache").join("kiln"))
    }

    /// A cache at `root`, created if needed.
    pub fn open(root: PathBuf) -> Result<Self, CacheError> {
        for sub in ["blobs/sha256", "partial", "bootstrap", "boot", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob with this digest lives (whether or not it exists yet).
    pub fn blob_path(&self, sha256_hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256_hex)
    }

    /// The blob with this digest, if the cache holds it.
    pub fn blob(&self, sha256_hex: &str) -> Option<PathBuf> {
        let p = self.blob_path(sha256_hex);
        p.is_file().then_some(p)
    }

    pub fn partial_path(&self, key: &str) -> PathBuf {
        self.root.join("partial").join(key)
    }

    pub fn bootstrap_dir(&self, key: &str) -> PathBuf {
        self.root.join("bootstrap").join(key)
    }

    pub fn boot_dir(&self, key: &str) -> PathBuf {
        self.root.join("boot").join(key)
    }

    /// A fresh work folder under `tmp/`, removed when the guard drops unless kept.
    pub fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir, CacheError> {
        let base = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&base)
            .map_err(io_err(&base))
    }

    /// Moves a finished file into the blob store under its digest. If another build stored the
    /// same blob meanwhile, the existing one wins (same bytes by construction).
    pub fn store_blob(&self, tmp: &Path, sha256_hex: &str) -> Result<PathBuf, CacheError> {
        let dst = self.blob_path(sha256_hex);
        if dst.is_file() {
            let _ = fs::remove_file(tmp);
            return Ok(dst);
        }
        fs::rename(tmp, &dst).map_err(io_err(&dst))?;
        Ok(dst)
    }
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The SHA-256 of bytes, as lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Parses a manifest checksum (`sha256:<hex>` or bare hex) into lowercase hex.
pub fn parse_sha256(s: &str) -> Option<String> {
    let hex_part = s.strip_prefix("sha256:").unwrap_or(s).trim();
    (hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex_part.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_store_and_digests() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c")).unwrap();
        let tmp = cache.root().join("tmp/x");
        fs::write(&tmp, b"abc").unwrap();
        let d = sha256_file(&tmp).unwrap();
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d, sha256_bytes(b"abc"));
        let p = cache.store_blob(&tmp, &d).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(cache.blob(&d), Some(p));
        assert!(cache.blob(&"0".repeat(64)).is_none());
    }

    #[test]
    fn checksum_forms() {
        let h = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_sha256(&format!("sha256:{h}")), Some(h.to_lowercase()));
        assert_eq!(parse_sha256(h), Some(h.to_lowercase()));
        assert_eq!(parse_sha256("sha256:abc"), None);
        assert_eq!(parse_sha256(&"g".repeat(64)), None);
    }
}
