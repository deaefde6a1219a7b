//! Sources: where each VM's boot disk comes from, brought into the cache and described for
//! the engine (the base image, and the kernel, initrd and root device for a direct boot).

pub mod bootstrap;
pub mod build_ref;
pub mod iso;
pub mod seed;
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
    #[error("opening {image}: {reason}")]
    Open { image: PathBuf, reason: String },
    // The cause is part of the message (not a `#[source]`): the build reports source errors
    // by their message alone.
    #[error("source {name}: {error}")]
    Untrusted {
        /// The URL or file as the manifest names it.
        name: String,
        error: kiln_disk::DiskError,
    },
    #[error("buildRef: {0}")]
    BuildRef(#[source] crate::module::ModuleError),
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
    /// The image's own kernel arguments (from its boot loader's configuration), kept on the
    /// command line beside what kiln adds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
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
    /// For `buildRef`: the parent module's boot disk, which `--thin` captures layer over.
    pub parent_disk: Option<ParentDisk>,
    /// For `buildRef`: the firmware the parent VM's module records and its captured NVRAM
    /// (path checked to be inside the parent module); the child boots the same way and starts
    /// from a copy of that NVRAM: see [`build_ref::inherited_firmware`]. None for other
    /// sources and for parents recorded without firmware.
    pub parent_firmware: Option<build_ref::ParentFirmware>,
}

/// A resolved source and, when it has no kernel kiln can read (`source.boot` is None), why:
/// such a source boots through firmware.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub source: ResolvedSource,
    pub no_kernel: Option<String>,
}

impl From<ResolvedSource> for Resolved {
    fn from(source: ResolvedSource) -> Self {
        Resolved {
            source,
            no_kernel: None,
        }
    }
}

/// A parent module's captured disk (a `buildRef` source's base).
#[derive(Debug, Clone)]
pub struct ParentDisk {
    pub module: String,
    /// The disk file (absolute or relative to the working folder).
    pub path: PathBuf,
    /// Its SHA-256 as the parent's module.yaml records it.
    pub sha256: String,
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
) -> Result<Resolved, SourceError> {
    match spec {
        SourceSpec::Blank => Ok(Resolved {
            source: ResolvedSource {
                base: None,
                boot: None,
                agent_in_image: false,
                parent_disk: None,
                parent_firmware: None,
                record: serde_json::json!({ "blank": true }),
            },
            no_kernel: Some("a blank disk has no kernel".into()),
        }),
        SourceSpec::Url { url, sha256 } => {
            let want = match sha256 {
                Some(s) => {
                    Some(parse_sha256(s).ok_or_else(|| SourceError::BadChecksum(s.clone()))?)
                }
                None => None,
            };
            let f = url::fetch(cache, url, want.as_deref(), Some(vm), events)?;
            check_untrusted(&f.path, url)?;
            let record = serde_json::json!({ "url": url, "sha256": f.sha256 });
            image_source(cache, &f.path, &f.sha256, record)
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
            check_untrusted(&stored, &path.display().to_string())?;
            let record = serde_json::json!({ "file": path, "sha256": digest });
            image_source(cache, &stored, &digest, record)
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
            Ok(Resolved::from(ResolvedSource {
                base: Some(base),
                boot: Some(BootFiles {
                    kernel: got.kernel.clone(),
                    initrd: Some(got.initrd.clone()),
                    root: got.meta.root_device.clone(),
                    args: vec![],
                }),
                agent_in_image: true,
                parent_disk: None,
                parent_firmware: None,
                record: serde_json::json!({
                    "bootstrap": {
                        "distro": b.distro,
                        "suite": b.suite,
                        "packages": b.packages,
                        "mirror": b.mirror,
                        "cacheKey": got.meta.key,
                        "recipe": got.meta.inputs.recipe,
                        "kernel": got.meta.kernel_version,
                        "kernelPackage": b.kernel.as_deref().unwrap_or(bootstrap::DEFAULT_KERNEL),
                        "agentSha256": got.meta.inputs.agent_sha256,
                        "packageVersions": got.meta.package_versions,
                        "diskSha256": got.meta.disk_sha256,
                    }
                }),
            }))
        }
        SourceSpec::BuildRef { module, vm: ref_vm } => {
            let source = build_ref::resolve(modules_dir, module, ref_vm.as_deref())
                .map_err(SourceError::BuildRef)?;
            let no_kernel = source
                .boot
                .is_none()
                .then(|| "the parent module has no kernel for a direct boot".to_string());
            Ok(Resolved { source, no_kernel })
        }
    }
}

/// A `url` or `file` image in the cache (digest `digest`) as a source: its kernel when kiln can
/// read one, else why not (it then boots through firmware).
fn image_source(
    cache: &Cache,
    image: &Path,
    digest: &str,
    record: serde_json::Value,
) -> Result<Resolved, SourceError> {
    let base = base_image(image)?;
    let boot = boot_files(cache, &base, digest)?;
    Ok(Resolved {
        no_kernel: boot.as_ref().err().cloned(),
        source: ResolvedSource {
            base: Some(base),
            boot: boot.ok(),
            agent_in_image: false,
            parent_disk: None,
            parent_firmware: None,
            record,
        },
    })
}

/// A downloaded or user-supplied image must stand alone: its backing name is a host path
/// of the author's choosing (`/etc/shadow`, `/dev/sda`, `../../..`), so it is refused, not
/// followed; kiln-disk's header checks (external data files refused) run too. All of this
/// happens before anything boots. `name` is the URL or file as the manifest gives it.
fn check_untrusted(image: &Path, name: &str) -> Result<(), SourceError> {
    kiln_disk::chain(
        image,
        None,
        kiln_disk::MAX_CHAIN_DEPTH,
        &kiln_disk::BackingPolicy::Refuse,
    )
    .map(drop)
    .map_err(|error| SourceError::Untrusted {
        name: name.to_string(),
        error,
    })
}

pub(crate) fn base_image(path: &Path) -> Result<BaseImage, SourceError> {
    let (format, virtual_size) = diskops::probe(path)?;
    Ok(BaseImage {
        path: path.to_path_buf(),
        format,
        virtual_size,
    })
}

/// An image's guest-visible bytes: raw files directly, qcow2 (compressed clusters too)
/// through kiln-disk's reader. Only `url` and `file` sources come here, and a backing file
/// of theirs is refused.
pub(crate) fn open_image(base: &BaseImage) -> Result<Arc<dyn bootimage::ImageRead>, SourceError> {
    Ok(match base.format {
        ImageFormat::Raw => {
            let f = fs::File::open(&base.path).map_err(|source| SourceError::File {
                path: base.path.clone(),
                source,
            })?;
            Arc::new(bootimage::RawImage(f))
        }
        ImageFormat::Qcow2 => {
            let dev =
                kiln_disk::open(&base.path, kiln_disk::OpenOptions::untrusted()).map_err(|e| {
                    SourceError::Open {
                        image: base.path.clone(),
                        reason: e.to_string(),
                    }
                })?;
            Arc::new(bootimage::DeviceImage(dev))
        }
    })
}

/// Kernel and initrd of an image, extracted once into `boot/<digest>/`; `Ok(Err(why))` when
/// the image has no kernel kiln can read (it then boots through firmware).
fn boot_files(
    cache: &Cache,
    base: &BaseImage,
    digest: &str,
) -> Result<Result<BootFiles, String>, SourceError> {
    let dir = cache.boot_dir(digest);
    let meta = dir.join("root");
    if let Ok(root) = fs::read_to_string(&meta) {
        let initrd = dir.join("initrd.img");
        // One argument a line; none when the file is absent (extracted before kiln kept them).
        let args = fs::read_to_string(dir.join("args"))
            .map(|a| a.lines().map(str::to_string).collect())
            .unwrap_or_default();
        return Ok(Ok(BootFiles {
            kernel: dir.join("vmlinuz"),
            initrd: initrd.is_file().then_some(initrd),
            root: root.trim().to_string(),
            args,
        }));
    }
    let img = open_image(base)?;
    let info = match bootimage::find_boot(img) {
        Ok(info) => info,
        Err(bootimage::BootImageError::Io(e)) => {
            return Err(SourceError::Boot {
                image: base.path.clone(),
                source: bootimage::BootImageError::Io(e),
            })
        }
        Err(e) => return Ok(Err(no_kernel_reason(&e))),
    };
    let tmp = cache.temp_dir("boot-")?;
    let w = |name: &str, data: &[u8]| {
        let p = tmp.path().join(name);
        fs::write(&p, data).map_err(|source| SourceError::File { path: p, source })
    };
    w("vmlinuz", &info.kernel)?;
    if let Some(i) = &info.initrd {
        w("initrd.img", i)?;
    }
    // Arguments never hold a newline (kargs::kept drops control characters).
    w("args", info.args.join("\n").as_bytes())?;
    w("root", info.root.as_bytes())?;
    let tmp_path = tmp.keep();
    if fs::rename(&tmp_path, &dir).is_err() {
        // Another build extracted it first.
        let _ = fs::remove_dir_all(&tmp_path);
    }
    boot_files(cache, base, digest)
}

/// Why kiln cannot boot an image's kernel directly, for the build's boot note.
fn no_kernel_reason(e: &bootimage::BootImageError) -> String {
    match e {
        bootimage::BootImageError::NoKernel { searched } => format!(
            "no kernel kiln can read (no ext4 file system with /boot/vmlinuz-*; {searched} \
             ext4 file system(s) searched)"
        ),
        other => format!("no kernel kiln can read ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tool(prog: &str) -> bool {
        Command::new(prog)
            .arg("--version")
            .output()
            .map(|o| o.status.success() || !o.stderr.is_empty())
            .unwrap_or(false)
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("spawning a tool");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A GPT disk with one Linux partition holding an ext4 root with `/boot` files, converted
    /// to a compressed qcow2: the layout of a cloud image, made small.
    fn partitioned_qcow2(dir: &Path) -> Option<PathBuf> {
        for t in ["mkfs.ext4", "sfdisk", "qemu-img"] {
            if !tool(t) {
                eprintln!("SKIP: {t} is not installed (packages e2fsprogs, fdisk, qemu-utils)");
                return None;
            }
        }
        let tree = dir.join("tree");
        fs::create_dir_all(tree.join("boot")).unwrap();
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/os-release"), "ID=debian\n").unwrap();
        fs::write(tree.join("boot/vmlinuz-6.1.0-9-cloud-amd64"), b"old kernel").unwrap();
        let kernel: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(tree.join("boot/vmlinuz-6.1.0-28-cloud-amd64"), &kernel).unwrap();
        fs::write(
            tree.join("boot/initrd.img-6.1.0-28-cloud-amd64"),
            b"the initrd",
        )
        .unwrap();
        fs::create_dir_all(tree.join("boot/grub")).unwrap();
        fs::write(
            tree.join("boot/grub/grub.cfg"),
            "menuentry 'Debian' {\n\tlinux /boot/vmlinuz-6.1.0-28-cloud-amd64 \
             root=/dev/sda1 ro console=tty0 consoleblank=0 'acpi_osi=Windows 2009'\n}\n",
        )
        .unwrap();
        let fsimg = dir.join("fs.raw");
        run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-U",
                "0b6c1a3e-8f4e-4c2a-9d55-7c1e2f3a4b5c",
                "-d",
            ])
            .arg(&tree)
            .arg(&fsimg)
            .arg("16M"));
        let raw = dir.join("disk.raw");
        let f = fs::File::create(&raw).unwrap();
        f.set_len(20 << 20).unwrap();
        drop(f);
        let mut sf = Command::new("sfdisk");
        sf.arg("-q")
            .arg(&raw)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = sf.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(b"label: gpt\nstart=2048, size=32768, type=linux\n")
                .unwrap();
        }
        assert!(child.wait().unwrap().success(), "sfdisk failed");
        let data = fs::read(&fsimg).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&raw).unwrap();
            f.write_all_at(&data, 2048 * 512).unwrap();
        }
        let q = dir.join("cloud.qcow2");
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-c", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q));
        Some(q)
    }

    #[test]
    fn qcow2_file_source_gives_its_kernel_initrd_and_root() {
        let d = tempfile::tempdir().unwrap();
        let Some(q) = partitioned_qcow2(d.path()) else {
            return;
        };
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let ev = crate::events::MemorySink::default();
        let spec = SourceSpec::File { path: q.clone() };
        let r = resolve(&cache, &spec, "vm", d.path(), d.path(), &ev)
            .unwrap()
            .source;
        let base = r.base.unwrap();
        assert_eq!(base.format, ImageFormat::Qcow2);
        assert_eq!(base.virtual_size, 20 << 20);
        let boot = r.boot.unwrap();
        let want: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(fs::read(&boot.kernel).unwrap(), want);
        assert_eq!(
            fs::read(boot.initrd.as_ref().unwrap()).unwrap(),
            b"the initrd"
        );
        assert_eq!(boot.root, "UUID=0b6c1a3e-8f4e-4c2a-9d55-7c1e2f3a4b5c");
        assert!(!r.agent_in_image);
        // The image's own arguments, without what kiln sets itself.
        let args = vec!["consoleblank=0".to_string(), "acpi_osi=Windows 2009".into()];
        assert_eq!(boot.args, args);
        // Resolved again: the same base from the blob store, boot files from the cache.
        let again = resolve(&cache, &spec, "vm", d.path(), d.path(), &ev).unwrap();
        assert_eq!(again.no_kernel, None);
        let again = again.source.boot.unwrap();
        assert_eq!(again.kernel, boot.kernel);
        assert_eq!(again.args, args);
        assert_eq!(again.root, boot.root);
    }

    /// `path` resolved as a `file` source, with a cache of its own in `dir`.
    fn resolve_file(dir: &Path, path: PathBuf) -> Result<Resolved, SourceError> {
        let cache = Cache::open(dir.join("cache")).unwrap();
        let ev = crate::events::MemorySink::default();
        resolve(&cache, &SourceSpec::File { path }, "vm", dir, dir, &ev)
    }

    #[test]
    fn an_image_without_a_kernel_resolves_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("zeros.raw");
        fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let r = resolve_file(d.path(), raw).unwrap();
        assert!(r.source.boot.is_none() && r.source.base.is_some());
        let why = r.no_kernel.unwrap();
        assert!(
            why.starts_with("no kernel kiln can read (no ext4 file system"),
            "{why}"
        );
    }

    #[test]
    fn corrupt_qcow2_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("bad.qcow2");
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 3; // version 3
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        fs::write(&q, h).unwrap();
        let err = resolve_file(d.path(), q).unwrap_err();
        let msg = err.to_string();
        // kiln-disk's header checks run on every file/url source before it is used.
        assert!(matches!(err, SourceError::Untrusted { .. }), "{msg}");
        assert!(msg.contains("corrupt or unsupported qcow2"), "{msg}");
    }
}
