//! Sources: where each VM's boot disk comes from, brought into the cache and described for
//! the engine (the base image, and the kernel, initrd and root device for a direct boot).

pub mod bootstrap;
pub mod url;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::bootimage;
use crate::cache::{parse_sha256, sha256_file, Cache};
use crate::diskops::{self, ImageFormat};
use crate::events::EventSink;
use crate::job::SourceSpec;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Download(#[from] url::DownloadError),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("checksum `{0}` is not sha256:<64 hex digits>")]
    BadChecksum(String),
    #[error("source file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("finding the kernel in {image}: {source}")]
    Boot {
        image: PathBuf,
        #[source]
        source: bootimage::BootImageError,
    },
    #[error(
        "{image} is a qcow2 image; reading its kernel needs kiln-disk's qcow2 reader, which is \
         not available yet (use a raw image or a bootstrap source)"
    )]
    Qcow2BootNotYet { image: PathBuf },
    #[error("buildRef: {0}")]
    BuildRef(String),
    #[error(transparent)]
    Disk(#[from] diskops::DiskOpError),
}

/// A base image in the cache.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
}

/// Kernel, initrd and root device for a direct kernel boot.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// `root=` value.
    pub root: String,
}

/// A source ready for a VM.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    /// None for `blank`.
    pub base: Option<BaseImage>,
    pub boot: Option<BootFiles>,
    /// Whether kiln's agent is already in the image (bootstrap and buildRef of one).
    pub agent_in_image: bool,
    /// The resolved inputs for module.yaml (URL with digest, package versions...).
    pub record: serde_json::Value,
}

/// Resolves a source. `manifest_dir` anchors relative `file` paths; `modules_dir` is where
/// `buildRef` modules are looked up.
pub fn resolve(
    cache: &Cache,
    spec: &SourceSpec,
    vm: &str,
    manifest_dir: &Path,
    modules_dir: &Path,
    events: &dyn EventSink,
) -> Result<ResolvedSource, SourceError> {
    match spec {
        SourceSpec::Blank => Ok(ResolvedSource {
            base: None,
            boot: None,
            agent_in_image: false,
            record: serde_json::json!({ "blank": true }),
        }),
        SourceSpec::Url { url, sha256 } => {
            let want = match sha256 {
                Some(s) => {
                    Some(parse_sha256(s).ok_or_else(|| SourceError::BadChecksum(s.clone()))?)
                }
                None => None,
            };
            let f = url::fetch(cache, url, want.as_deref(), Some(vm), events)?;
            let base = base_image(&f.path)?;
            let boot = boot_files(cache, &base, &f.sha256)?;
            Ok(ResolvedSource {
                base: Some(base),
                boot: Some(boot),
                agent_in_image: false,
                record: serde_json::json!({ "url": url, "sha256": f.sha256 }),
            })
        }
        SourceSpec::File { path } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                manifest_dir.join(path)
            };
            let digest = sha256_file(&path).map_err(|source| SourceError::File {
                path: path.clone(),
                source,
            })?;
            // Into the content-addressed store: a hard link when on the same file system,
            // else a copy, so later edits of the file do not change a cached build's base.
            let stored = match cache.blob(&digest) {
                Some(p) => p,
                None => {
                    let tmp = cache.temp_dir("import-")?;
                    let t = tmp.path().join("image");
                    if fs::hard_link(&path, &t).is_err() {
                        fs::copy(&path, &t).map_err(|source| SourceError::File {
                            path: path.clone(),
                            source,
                        })?;
                    }
                    cache.store_blob(&t, &digest)?
                }
            };
            let base = base_image(&stored)?;
            let boot = boot_files(cache, &base, &digest)?;
            Ok(ResolvedSource {
                base: Some(base),
                boot: Some(boot),
                agent_in_image: false,
                record: serde_json::json!({ "file": path, "sha256": digest }),
            })
        }
        SourceSpec::Bootstrap(b) => {
            let agent = bootstrap::AgentFiles::locate()?;
            let got = bootstrap::ensure(cache, b, &agent, Some(vm), events)?;
            if got.cached {
                events.emit(&crate::events::Event::Note {
                    vm: Some(vm.to_string()),
                    message: format!("bootstrap base from the cache ({})", &got.meta.key[..12]),
                });
            }
            let base = base_image(&got.disk)?;
            Ok(ResolvedSource {
                base: Some(base),
                boot: Some(BootFiles {
                    kernel: got.kernel.clone(),
                    initrd: Some(got.initrd.clone()),
                    root: got.meta.root_device.clone(),
                }),
                agent_in_image: true,
                record: serde_json::json!({
                    "bootstrap": {
                        "distro": b.distro,
                        "suite": b.suite,
                        "packages": b.packages,
                        "mirror": b.mirror,
                        "cacheKey": got.meta.key,
                        "recipe": got.meta.inputs.recipe,
                        "kernel": got.meta.kernel_version,
                        "agentSha256": got.meta.inputs.agent_sha256,
                        "packageVersions": got.meta.package_versions,
                        "diskSha256": got.meta.disk_sha256,
                    }
                }),
            })
        }
        SourceSpec::BuildRef { module, vm: ref_vm } => {
            crate::module::resolve_build_ref(modules_dir, module, ref_vm.as_deref())
                .map_err(|e| SourceError::BuildRef(e.to_string()))
        }
    }
}

pub(crate) fn base_image(path: &Path) -> Result<BaseImage, SourceError> {
    let (format, virtual_size) = diskops::probe(path)?;
    Ok(BaseImage {
        path: path.to_path_buf(),
        format,
        virtual_size,
    })
}

/// Kernel and initrd of an image, extracted once into `boot/<digest>/`.
fn boot_files(cache: &Cache, base: &BaseImage, digest: &str) -> Result<BootFiles, SourceError> {
    let dir = cache.boot_dir(digest);
    let meta = dir.join("root");
    if let Ok(root) = fs::read_to_string(&meta) {
        let initrd = dir.join("initrd.img");
        return Ok(BootFiles {
            kernel: dir.join("vmlinuz"),
            initrd: initrd.is_file().then_some(initrd),
            root: root.trim().to_string(),
        });
    }
    let img: Arc<dyn bootimage::ImageRead> = match base.format {
        ImageFormat::Raw => {
            let f = fs::File::open(&base.path).map_err(|source| SourceError::File {
                path: base.path.clone(),
                source,
            })?;
            Arc::new(bootimage::RawImage(f))
        }
        ImageFormat::Qcow2 => {
            return Err(SourceError::Qcow2BootNotYet {
                image: base.path.clone(),
            })
        }
    };
    let info = bootimage::find_boot(img).map_err(|source| SourceError::Boot {
        image: base.path.clone(),
        source,
    })?;
    let tmp = cache.temp_dir("boot-")?;
    let w = |name: &str, data: &[u8]| {
        let p = tmp.path().join(name);
        fs::write(&p, data).map_err(|source| SourceError::File { path: p, source })
    };
    w("vmlinuz", &info.kernel)?;
    if let Some(i) = &info.initrd {
        w("initrd.img", i)?;
    }
    w("root", info.root.as_bytes())?;
    let tmp_path = tmp.keep();
    if fs::rename(&tmp_path, &dir).is_err() {
        // Another build extracted it first.
        let _ = fs::remove_dir_all(&tmp_path);
    }
    boot_files(cache, base, digest)
}
