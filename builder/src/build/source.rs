//! Source: the VM's source resolved (downloaded, imported, or a `buildRef` parent's disk), its
//! cloud-init seed and its disks made as overlays over it; and, for the whole module before
//! anything boots, every `files` URL and every ISO fetched into the cache.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::boot_path::{self, BootPath};
use super::error::{IsoPrefetchError, PrefetchError, VmError};
use super::layers::VmLayers;
use super::media;
use super::vm::VmBuild;
use crate::cache::Cache;
use crate::diskops;
use crate::engine::firmware::HostFirmware;
use crate::engine::{BootMode, DiskAttach, FirmwareBoot, Peripherals};
use crate::events::{Event, EventSink};
use crate::job::{BuildJob, DiskJob, FileContent, Firmware};
use crate::nvram;
use crate::path_io::PathIoError;
use crate::sources::{self, build_ref, Resolved};

/// Resolves the VM's source: its base image and boot files, in the cache.
pub(super) fn resolve(b: &VmBuild) -> Result<Resolved, VmError> {
    let manifest_dir = b
        .module
        .job
        .manifest_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Ok(sources::resolve(
        &b.module.opts.cache,
        &b.vm.source,
        &b.vm.name,
        &manifest_dir,
        &b.module.opts.output,
        b.events(),
    )?)
}

/// What the VM boots: its kernel or firmware, its disks (overlays over the source) and, for an
/// image without kiln's agent, the seed that installs it.
pub(super) struct VmDisks {
    /// Direct (the source's kernel) or firmware (with the VM's own NVRAM for UEFI).
    pub boot: BootMode,
    /// The firmware the image is for (a `buildRef` child's inherited), recorded even when the
    /// VM booted directly.
    pub firmware: Firmware,
    /// The VM's own disks, in the manifest's order; captured at the end.
    pub disks: Vec<DiskAttach>,
    /// The cloud-init NoCloud seed, attached read-only after the disks and never captured.
    pub seed: Option<PathBuf>,
    /// CD-ROMs, a floppy and a screen for an ISO install: the build's only, never captured.
    pub peripherals: Peripherals,
}

/// Makes the VM's disks, as overlays over its source, or, resumed from the step cache, over
/// the top layer's disks (and its NVRAM copied from the layer).
pub(super) fn prepare_disks(
    b: &VmBuild,
    src: &Resolved,
    layers: Option<&VmLayers>,
) -> Result<VmDisks, VmError> {
    // A buildRef child boots through its parent's firmware, from its NVRAM, unless its own
    // manifest asks for another.
    let inherited = build_ref::inherited_firmware(
        &b.vm.name,
        b.vm.firmware,
        src.source.parent_firmware.as_ref(),
    );
    if let Some(note) = &inherited.note {
        b.note(note.clone());
    }
    let chosen = boot_path::choose(
        b.vm,
        &inherited,
        src.source.boot.as_ref(),
        src.no_kernel.as_deref(),
    )?;
    b.note(chosen.note());
    let work = b.work_dir();
    let boot = match chosen.path {
        BootPath::Direct(files) => BootMode::Direct(files),
        BootPath::Firmware(firmware) => {
            // Checked before anything boots: a missing SeaBIOS or OVMF names its package.
            let files = HostFirmware::find().files(firmware)?;
            let nvram = match &files.vars_template {
                Some(template) => {
                    // Made once before the first boot: every reboot of the build uses it, so
                    // what the guest writes (boot entries) stays, and capture keeps it.
                    let path = nvram_path(&work, &b.vm.name);
                    fs::create_dir_all(&work)
                        .map_err(PathIoError::at("creating", &work))
                        .map_err(nvram::NvramError::from)?;
                    nvram::start_nvram(&path, inherited.nvram, template)?;
                    if let Some(from) = layers.and_then(VmLayers::nvram) {
                        fs::copy(&from, &path)
                            .map_err(PathIoError::at("copying", &from))
                            .map_err(nvram::NvramError::from)?;
                    }
                    Some(path)
                }
                None => None,
            };
            BootMode::Firmware(FirmwareBoot { firmware, nvram })
        }
    };
    let src = &src.source;
    // Images without kiln's agent get it through a cloud-init NoCloud seed, attached
    // read-only after the VM's disks and never captured.
    let seed = sources::seed::prepare(b.vm, src.agent_in_image, &work)?;
    let mut disks = Vec::new();
    for (i, d) in b.vm.disks.iter().enumerate() {
        let path = work.join(format!("{}-{}.qcow2", b.vm.name, d.name));
        let base = if i == 0 { src.base.as_ref() } else { None };
        if let Some(base) = base {
            if d.size_bytes < base.virtual_size {
                return Err(VmError::DiskTooSmall {
                    disk: d.name.clone(),
                    size: d.size_bytes,
                    base: base.virtual_size,
                });
            }
        }
        let layer = layers.and_then(|l| l.base_of(&d.name));
        let under = match &layer {
            Some(l) => Some((l.as_path(), diskops::ImageFormat::Qcow2)),
            None => base.map(|b| (b.path.as_path(), b.format)),
        };
        diskops::create_overlay(under, &path, d.size_bytes).map_err(VmError::Overlay)?;
        disks.push(attach(d, path));
    }
    Ok(VmDisks {
        boot,
        firmware: inherited.firmware,
        disks,
        seed,
        peripherals: media::peripherals(b)?,
    })
}

/// Where the VM's NVRAM is kept during the build.
pub(super) fn nvram_path(work: &Path, vm: &str) -> PathBuf {
    work.join(format!("{vm}-nvram.fd"))
}

/// The engine's view of one of the VM's own disks: writable, on the bus the manifest gave it.
fn attach(d: &DiskJob, path: PathBuf) -> DiskAttach {
    DiskAttach {
        name: d.name.clone(),
        path,
        read_only: false,
        bus: d.bus,
    }
}

/// The job with every `files` URL (named files and file steps' own) fetched into the cache:
/// each URL once, with download progress events; the first that fails names itself and why.
pub(super) fn prefetch_files(
    job: &BuildJob,
    cache: &Cache,
    ev: &dyn EventSink,
) -> Result<BuildJob, PrefetchError> {
    let mut fetched: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = job.clone();
    // Named files first, so a failure names the `files[]` entry rather than a step's copy.
    let mut entries: Vec<(&String, &mut FileContent)> = out.files.iter_mut().collect();
    entries.sort_by_key(|(name, _)| name.starts_with('\0'));
    for (name, content) in entries {
        let FileContent::Url(url) = content else {
            continue;
        };
        let path = match fetched.get(url.as_str()) {
            Some(p) => p.clone(),
            None => {
                ev.emit(&Event::Note {
                    vm: None,
                    message: format!("fetching {url}"),
                });
                let f = sources::url::fetch(cache, url, None, None, ev).map_err(|error| {
                    PrefetchError {
                        file: name.clone(),
                        error,
                    }
                })?;
                fetched.insert(url.clone(), f.path.clone());
                f.path
            }
        };
        *content = FileContent::Cached {
            url: url.clone(),
            path,
        };
    }
    Ok(out)
}

/// The job with every VM's `isos` in the cache, each checked against its checksum (or, past
/// `isoCacheTTL`, checked again) and given the digest it was fetched under: before anything
/// boots, so a dead URL or a wrong checksum fails the build at once.
pub(super) fn prefetch_isos(
    job: &BuildJob,
    cache: &Cache,
    ev: &dyn EventSink,
) -> Result<BuildJob, Box<IsoPrefetchError>> {
    let mut out = job.clone();
    for vm in &mut out.vms {
        for iso in &mut vm.isos {
            let f = sources::iso::fetch(
                cache,
                &iso.url,
                iso.sha256.as_deref(),
                job.iso_cache_ttl,
                &vm.name,
                ev,
            )
            .map_err(|error| {
                Box::new(IsoPrefetchError {
                    vm: vm.name.clone(),
                    url: iso.url.clone(),
                    error,
                })
            })?;
            iso.sha256 = Some(f.sha256);
        }
    }
    Ok(out)
}

/// Files of the job, for tests that build jobs by hand.
pub fn inline_files(pairs: &[(&str, &str)]) -> BTreeMap<String, FileContent> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), FileContent::Inline(v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    /// A loopback server answering every GET with `body`; counts the requests.
    fn serve(body: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
        (port, hits)
    }

    fn job(files: BTreeMap<String, FileContent>) -> BuildJob {
        BuildJob {
            name: "m".into(),
            manifest_path: PathBuf::from("m.yaml"),
            manifest_text: String::new(),
            vms: vec![],
            files,
            http_directory: vec![],
            timeout: Duration::from_secs(60),
            retries: 0,
            iso_cache_ttl: Duration::from_secs(86400),
            network: Default::default(),
            base: Default::default(),
        }
    }

    #[test]
    fn each_disk_keeps_its_bus_from_the_manifest_to_the_engine() {
        let text = "vms:\n  - name: a\n    source: { bootstrap: { distro: debian, suite: bookworm } }\n    resources: { cpu: 1, memory: 512Mi }\n    disks:\n      - { name: root, size: 4Gi }\n      - { name: data, size: 1Gi, bus: scsi }\n      - { name: old, size: 1Gi, bus: sata }\n";
        let m = Path::new("m.yaml");
        let plan = crate::manifest::load_str(text, m, Default::default())
            .into_plan()
            .unwrap();
        let job = crate::plan_adapter::job_from_plan(&plan, m, text).unwrap();
        let buses: Vec<_> = job.vms[0]
            .disks
            .iter()
            .map(|d| attach(d, PathBuf::from("/w/d.qcow2")))
            .map(|a| (a.name, a.bus))
            .collect();
        use crate::job::DiskBus::*;
        assert_eq!(
            buses,
            [
                ("root".into(), Virtio),
                ("data".into(), Scsi),
                ("old".into(), Sata)
            ]
        );
    }

    #[test]
    fn each_url_is_fetched_once_into_the_cache_and_a_dead_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let (port, hits) = serve(b"\x00tool bytes\xff");
        let url = format!("http://127.0.0.1:{port}/tool.tar");
        let mut files = inline_files(&[("motd", "hi\n")]);
        files.insert("tool.tar".into(), FileContent::Url(url.clone()));
        // A file step's own copy of the same URL.
        files.insert("\0step:a:0".into(), FileContent::Url(url.clone()));
        let ev = crate::events::MemorySink::default();
        let out = prefetch_files(&job(files), &cache, &ev).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1, "one download per URL");
        for key in ["tool.tar", "\0step:a:0"] {
            match &out.files[key] {
                FileContent::Cached { url: u, path } => {
                    assert_eq!(u, &url);
                    assert!(path.starts_with(cache.root()));
                    assert_eq!(fs::read(path).unwrap(), b"\x00tool bytes\xff");
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(matches!(&out.files["motd"], FileContent::Inline(s) if s == "hi\n"));

        // A dead URL: the named entry is reported, with the URL and why.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = format!("http://127.0.0.1:{port}/gone.tar");
        let mut files = BTreeMap::new();
        files.insert("\0step:a:0".into(), FileContent::Url(dead.clone()));
        files.insert("gone.tar".into(), FileContent::Url(dead.clone()));
        let e = prefetch_files(&job(files), &cache, &ev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file `gone.tar`") && e.contains(&dead), "{e}");
        assert!(e.contains("nothing was booted"), "{e}");
    }

    #[test]
    fn isos_get_the_digest_they_were_fetched_under_and_a_bad_one_names_vm_and_url() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let (port, hits) = serve(b"CD001 an installer");
        let url = format!("http://127.0.0.1:{port}/i.iso");
        let job = |checksum: &str| {
            let text = format!("vms:\n  - name: a\n    source: {{ blank: true }}\n    resources: {{ cpu: 1, memory: 512Mi }}\n    isos: [{{ url: \"{url}\"{checksum} }}]\n");
            let m = Path::new("m.yaml");
            let plan = crate::manifest::load_str(&text, m, Default::default())
                .into_plan()
                .unwrap();
            crate::plan_adapter::job_from_plan(&plan, m, &text).unwrap()
        };
        let ev = crate::events::MemorySink::default();
        // Without a checksum: the digest kiln computed, for module.yaml and the CD's blob.
        let out = prefetch_isos(&job(""), &cache, &ev).unwrap();
        let sum = crate::cache::sha256_bytes(b"CD001 an installer");
        assert_eq!(out.vms[0].isos[0].sha256.as_deref(), Some(sum.as_str()));
        assert!(cache.blob(&sum).is_some());
        // The same, checked: from the cache, within the TTL.
        let out = prefetch_isos(&job(&format!(", checksum: \"sha256:{sum}\"")), &cache, &ev);
        assert_eq!(out.unwrap().vms[0].isos[0].sha256, Some(sum));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let wrong = "0".repeat(64);
        let e = prefetch_isos(
            &job(&format!(", checksum: \"sha256:{wrong}\"")),
            &cache,
            &ev,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("VM `a`: ISO {url}: checksum mismatch")),
            "{e}"
        );
        assert_eq!(e.matches("nothing was booted").count(), 1, "{e}");
    }
}
