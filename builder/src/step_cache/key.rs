//! Layer keys: the state of a VM's disks after step N is named by a SHA-256 chained over
//! everything that can change it.
//!
//! The key before the first step (the VM's root) covers the source (its resolved record:
//! URL and digest, bootstrap recipe and disk digest, parent module's disk digest...), the
//! agent kiln installs, every VM setting that can reach the guest (resources, disks, NICs
//! and their MACs, cloud-init, firmware and boot, ISOs, floppy, boot command, communicator),
//! the content of every file the build serves over `httpDirectory` or puts on the floppy,
//! and the cache format. Each step's key is its parent's key and the step's definition as
//! it runs (its environment included), with, for a `file` step, the content of its file.
//!
//! In a module of several VMs, a VM with a NIC can depend on every other VM with a NIC
//! (services it reaches, files it copies): its root also covers those VMs' whole
//! definitions and steps, so editing any of them rebuilds it. Conservative by design: when
//! the rule cannot tell, it does not reuse.
//!
//! Not cached at all: a VM with an ISO given without a checksum (its content is not known
//! until downloaded). Not cached from a step on: a `handbuild` step (manual work), a step
//! with `cache: false`, and every step after either. Reboot steps take no layer: resuming
//! boots the VM anyway.

use sha2::{Digest, Sha256};

use crate::cache::{sha256_bytes, sha256_file};
use crate::job::{BuildJob, FileContent, Step, StepKind, VmJob};

/// Raised whenever what goes into a key changes meaning.
const KEY_VERSION: &str = "kiln step cache 1";

/// The most layers one VM's chain takes (qcow2 chains deeper than kiln-disk's limit of 64
/// cannot be opened; the source may bring a chain of its own).
pub const MAX_LAYERS: usize = 40;

/// A VM's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepKeys {
    /// `keys[i]`: the state after step `i` (0-based).
    pub keys: Vec<String>,
    /// Whether a layer is taken after step `i`.
    pub layered: Vec<bool>,
    /// Why none of this VM's steps is cached, if none is.
    pub off: Option<String>,
}

impl StepKeys {
    /// The key of the layer below step `i` (None: the source).
    pub fn parent_of(&self, i: usize) -> Option<&str> {
        (0..i)
            .rev()
            .find(|&j| self.layered[j])
            .map(|j| self.keys[j].as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading `{file}` for the step cache's key: {source}")]
pub struct KeyError {
    file: String,
    #[source]
    source: std::io::Error,
}

/// The content digest of a `files[]` entry, None when its content is not known (a URL not
/// fetched).
fn file_digest(job: &BuildJob, name: &str) -> Result<Option<String>, KeyError> {
    Ok(match job.files.get(name) {
        Some(FileContent::Inline(s)) => Some(sha256_bytes(s.as_bytes())),
        Some(FileContent::Cached { path, .. }) => match blob_digest(path) {
            // A blob of the cache is named by its digest: not read again for each VM.
            Some(d) => Some(d),
            None => Some(sha256_file(path).map_err(|source| KeyError {
                file: name.into(),
                source,
            })?),
        },
        Some(FileContent::Url(_)) | None => None,
    })
}

/// The digest a blob of the cache (`blobs/sha256/<hex>`) is stored under.
fn blob_digest(path: &std::path::Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let in_store = path.parent()?.ends_with("blobs/sha256");
    (in_store && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

/// What of a VM reaches its guest before the first step, as text: the job's own fields,
/// less those that cannot change the disk (names of steps are in the steps' part).
fn vm_material(vm: &VmJob) -> String {
    let mut v = vm.clone();
    v.steps.clear();
    // Bounds and console visibility never reach the guest.
    v.boot_timeout = std::time::Duration::ZERO;
    v.invisible = false;
    format!("{v:?}")
}

fn step_material(job: &BuildJob, step: &Step) -> Result<String, KeyError> {
    let mut s = step.clone();
    // A bound and a cache switch never change what a step that succeeded did.
    s.timeout = None;
    s.cache = true;
    let mut m = format!("{s:?}");
    if let StepKind::File { file, .. } = &step.kind {
        m.push_str(&format!(
            "\nfile {file}: {}",
            file_digest(job, file)?.unwrap_or_else(|| "unknown".into())
        ));
    }
    Ok(m)
}

/// The keys of `vm`'s steps as they run (`steps`: with the build's environment added),
/// over the source resolved as `source` and the agent kiln installs (`agent`).
pub fn vm_keys(
    job: &BuildJob,
    vm: &VmJob,
    steps: &[Step],
    source: &serde_json::Value,
    agent: Option<&str>,
) -> Result<StepKeys, KeyError> {
    let mut h = Sha256::new();
    let mut line = |s: &str| {
        h.update(s.as_bytes());
        h.update(b"\n");
    };
    line(KEY_VERSION);
    line(&source.to_string());
    line(&format!("agent {}", agent.unwrap_or("none")));
    line(&vm_material(vm));
    let mut off = None;
    let served = job.http_directory.iter().chain(&vm.floppy_files);
    for name in served {
        match file_digest(job, name)? {
            Some(d) => line(&format!("file {name}: {d}")),
            None => off = Some(format!("file `{name}` has no known content")),
        }
    }
    if let Some(iso) = vm.isos.iter().find(|i| i.sha256.is_none()) {
        off = Some(format!(
            "ISO {} has no checksum, so its content is not known before it is read",
            iso.url
        ));
    }
    if !vm.nics.is_empty() {
        for peer in job
            .vms
            .iter()
            .filter(|p| p.name != vm.name && !p.nics.is_empty())
        {
            line(&format!("peer {}", vm_material(peer)));
            for s in &peer.steps {
                line(&step_material(job, s)?);
            }
        }
    }
    let root = hex::encode(h.finalize());

    let mut keys = Vec::with_capacity(steps.len());
    let mut layered = Vec::with_capacity(steps.len());
    let mut parent = root;
    let mut open = off.is_none();
    for s in steps {
        let mut h = Sha256::new();
        h.update(parent.as_bytes());
        h.update(b"\n");
        h.update(step_material(job, s)?.as_bytes());
        parent = hex::encode(h.finalize());
        keys.push(parent.clone());
        open &= s.cache && !matches!(s.kind, StepKind::Handbuild { .. });
        let count = layered.iter().filter(|&&l| l).count();
        layered.push(open && !matches!(s.kind, StepKind::Reboot { .. }) && count < MAX_LAYERS);
    }
    Ok(StepKeys { keys, layered, off })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{NicJob, SourceSpec};
    use std::collections::BTreeMap;

    fn shell(name: &str, script: &str) -> Step {
        Step {
            name: name.into(),
            timeout: None,
            cache: true,
            kind: StepKind::Shell {
                inline: script.into(),
                env: BTreeMap::new(),
                execute_command: None,
            },
        }
    }

    fn job(vms: Vec<VmJob>) -> BuildJob {
        BuildJob {
            name: "m".into(),
            manifest_path: "/m.yaml".into(),
            manifest_text: String::new(),
            vms,
            files: BTreeMap::from([("f".to_string(), FileContent::Inline("one".into()))]),
            http_directory: vec![],
            timeout: std::time::Duration::from_secs(60),
            retries: 0,
            iso_cache_ttl: std::time::Duration::ZERO,
            network: Default::default(),
            base: crate::job::BaseView {
                network: Default::default(),
                vms: vec![],
            },
        }
    }

    fn vm(name: &str, steps: Vec<Step>) -> VmJob {
        let mut v = VmJob::for_test(name, SourceSpec::Blank);
        v.steps = steps;
        v
    }

    fn keys_of(j: &BuildJob, v: &VmJob) -> StepKeys {
        vm_keys(
            j,
            v,
            &v.steps,
            &serde_json::json!({"blank": true}),
            Some("a1"),
        )
        .unwrap()
    }

    fn three() -> Vec<Step> {
        vec![
            shell("a", "echo a"),
            shell("b", "echo b"),
            shell("c", "echo c"),
        ]
    }

    #[test]
    fn an_edited_step_changes_its_key_and_every_key_after_it_only() {
        let v = vm("v", three());
        let j = job(vec![v.clone()]);
        let before = keys_of(&j, &v);
        assert_eq!(before, keys_of(&j, &v), "the same inputs, the same keys");
        for edited in 0..3 {
            let mut w = v.clone();
            w.steps[edited] = shell("x", "echo x");
            let after = keys_of(&j, &w);
            for i in 0..3 {
                assert_eq!(before.keys[i] == after.keys[i], i < edited, "step {i}");
            }
        }
        // A timeout never changes a key; resources and the source do.
        let mut w = v.clone();
        w.steps[0].timeout = Some(std::time::Duration::from_secs(5));
        w.boot_timeout = std::time::Duration::from_secs(1);
        assert_eq!(keys_of(&j, &w).keys, before.keys);
        w.memory_mib += 1;
        assert_ne!(keys_of(&j, &w).keys[0], before.keys[0]);
        let other = vm_keys(
            &j,
            &v,
            &v.steps,
            &serde_json::json!({"blank": false}),
            Some("a1"),
        )
        .unwrap();
        assert_ne!(other.keys[0], before.keys[0]);
        let agent = vm_keys(&j, &v, &v.steps, &serde_json::json!({"blank": true}), None).unwrap();
        assert_ne!(agent.keys[0], before.keys[0]);
    }

    #[test]
    fn a_file_step_follows_its_files_content() {
        let mut v = vm("v", three());
        v.steps[1] = Step {
            name: "put".into(),
            timeout: None,
            cache: true,
            kind: StepKind::File {
                file: "f".into(),
                destination: "/f".into(),
            },
        };
        let mut j = job(vec![v.clone()]);
        let before = keys_of(&j, &v);
        j.files
            .insert("f".into(), FileContent::Inline("two".into()));
        let after = keys_of(&j, &v);
        assert_eq!(before.keys[0], after.keys[0]);
        assert_ne!(before.keys[1], after.keys[1]);
        assert_ne!(before.keys[2], after.keys[2]);
        // A file served over httpDirectory is something any step may read.
        j.http_directory = vec!["f".into()];
        let served = keys_of(&j, &v);
        assert_ne!(served.keys[0], after.keys[0]);
    }

    #[test]
    fn reboots_take_no_layer_and_nothing_after_an_opt_out_or_a_handbuild_is_layered() {
        let mut v = vm("v", three());
        v.steps.insert(
            1,
            Step {
                name: "r".into(),
                timeout: None,
                cache: true,
                kind: StepKind::Reboot { command: None },
            },
        );
        let j = job(vec![v.clone()]);
        assert_eq!(keys_of(&j, &v).layered, vec![true, false, true, true]);
        let k = keys_of(&j, &v);
        assert_eq!(k.parent_of(2), Some(k.keys[0].as_str()));
        assert_eq!(k.parent_of(0), None);
        let mut w = v.clone();
        w.steps[2].cache = false;
        assert_eq!(keys_of(&j, &w).layered, vec![true, false, false, false]);
        let mut w = v.clone();
        w.steps[0] = Step {
            name: "h".into(),
            timeout: None,
            cache: true,
            kind: StepKind::Handbuild {
                instructions: "do".into(),
            },
        };
        assert_eq!(keys_of(&j, &w).layered, vec![false; 4]);
    }

    #[test]
    fn networked_vms_cover_their_peers_and_unchecked_isos_turn_the_cache_off() {
        let nic = NicJob {
            name: "n".into(),
            subnet: "s".into(),
            mac: crate::mac::Mac::new([0x52, 0x54, 0, 0, 0, 1]).unwrap(),
            ip: None,
            model: Default::default(),
        };
        let mut a = vm("a", three());
        let mut b = vm("b", three());
        let c = vm("c", three());
        a.nics = vec![nic.clone()];
        b.nics = vec![nic];
        let j = job(vec![a.clone(), b.clone(), c.clone()]);
        let (ka, kc) = (keys_of(&j, &a), keys_of(&j, &c));
        let mut b2 = b.clone();
        b2.steps[2] = shell("c", "echo changed");
        let j2 = job(vec![a.clone(), b2, c.clone()]);
        assert_ne!(
            keys_of(&j2, &a).keys[0],
            ka.keys[0],
            "a peer's step changed"
        );
        assert_eq!(
            keys_of(&j2, &c).keys,
            kc.keys,
            "c has no NIC: nothing reaches it"
        );

        let mut d = vm("d", three());
        d.isos = vec![crate::job::IsoJob {
            url: "http://127.0.0.1/x.iso".into(),
            sha256: None,
        }];
        let k = keys_of(&job(vec![d.clone()]), &d);
        assert!(k.off.as_deref().unwrap().contains("no checksum"));
        assert_eq!(k.layered, vec![false; 3]);
    }
}
