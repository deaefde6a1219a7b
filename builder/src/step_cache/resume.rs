//! Where a build of a VM can start: the longest chain of its steps' layers that the cache
//! holds whole, each layer backed by the one before it (and the first by this build's
//! source), checked file by file.

use std::path::{Path, PathBuf};

use super::key::StepKeys;
use super::store::{self, LayerRecord, LayerStore};
use crate::job::{Step, StepKind};

/// A VM resumed from the cache.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The first step to run (every step before it is in the layers, or a reboot).
    pub next: usize,
    /// The top layer's folder: the VM's disks are overlays over its files.
    pub dir: PathBuf,
    /// The chain, bottom first: (step index, key).
    pub layers: Vec<(usize, String)>,
    /// How long the reused steps ran when they were made.
    pub saved_seconds: f64,
}

/// What the layers must sit on.
pub struct Below<'a> {
    /// The VM's writable disks, by manifest name, in order; the first holds the source.
    pub disks: &'a [String],
    /// The source's image under the first disk (canonical path), None for a blank one.
    pub base: Option<&'a Path>,
}

fn canonical(p: &Path) -> Option<String> {
    std::fs::canonicalize(p)
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
}

/// Whether `rec`'s disks sit on `below` (the parent layer's folder, or the source).
fn links(rec: &LayerRecord, parent_dir: Option<&Path>, below: &Below<'_>) -> Result<(), String> {
    if rec.disks.len() != below.disks.len() {
        return Err(format!(
            "it has {} disks, the VM {}",
            rec.disks.len(),
            below.disks.len()
        ));
    }
    for (i, name) in below.disks.iter().enumerate() {
        let f = rec
            .disks
            .iter()
            .find(|f| &f.name == name)
            .ok_or_else(|| format!("it has no disk `{name}`"))?;
        let want = match parent_dir {
            Some(d) => canonical(&d.join(store::disk_file(name))),
            None if i == 0 => below.base.and_then(canonical),
            None => None,
        };
        if f.backing != want {
            return Err(format!(
                "disk `{name}` is backed by {:?}, not {:?}",
                f.backing, want
            ));
        }
    }
    Ok(())
}

/// The longest reusable prefix of `steps`, if any step can be skipped.
pub fn find_resume(
    store: &LayerStore,
    keys: &StepKeys,
    steps: &[Step],
    below: &Below<'_>,
) -> Option<Resume> {
    let mut found: Option<(usize, PathBuf)> = None;
    let mut layers = Vec::new();
    let mut saved = 0.0;
    for (i, step) in steps.iter().enumerate() {
        if !keys.layered[i] {
            if matches!(step.kind, StepKind::Reboot { .. }) && step.cache {
                continue;
            }
            break;
        }
        let Some(rec) = store.verified(&keys.keys[i]) else {
            break;
        };
        let parent_key = layers.last().map(|(_, k): &(usize, String)| k.as_str());
        if rec.parent.as_deref() != parent_key {
            break;
        }
        if let Err(why) = links(&rec, found.as_ref().map(|(_, d)| d.as_path()), below) {
            tracing::warn!(key = %rec.key, "not reusing a cached layer: {why}");
            break;
        }
        saved += rec.seconds;
        layers.push((i, rec.key.clone()));
        found = Some((i, store.dir(&rec.key)));
    }
    let (last, dir) = found?;
    for (_, k) in &layers {
        store.touch(k);
    }
    // A default reboot right after the chain is what booting from it does anyway.
    let mut next = last + 1;
    while steps
        .get(next)
        .is_some_and(|s| matches!(s.kind, StepKind::Reboot { command: None }) && s.cache)
    {
        next += 1;
    }
    Some(Resume {
        next,
        dir,
        layers,
        saved_seconds: saved,
    })
}
