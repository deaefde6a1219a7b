//! The step cache in a VM's build (see [`crate::step_cache`]): its steps' keys and where it
//! resumes, worked out before its disks are made; a checkpoint after each step that takes a
//! layer; and what the module records of it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::vm::VmBuild;
use crate::engine::DiskAttach;
use crate::events::{ms, Event};
use crate::guest::Guest;
use crate::job::{CommunicatorJob, Step, StepShell};
use crate::module::LayerRef;
use crate::sources::ResolvedSource;
use crate::step_cache::resume::Below;
use crate::step_cache::{self, Checkpointer, Freeze, LayerStore, Resume, StepInfo, StepKeys};

/// One VM's step cache for this build.
pub(super) struct VmLayers {
    store: LayerStore,
    pub keys: StepKeys,
    pub resume: Option<Resume>,
    /// Seconds the steps since the last layer ran.
    since_layer: Mutex<f64>,
    /// What the module records: the layers reused, then the ones taken.
    taken: Mutex<Vec<LayerRef>>,
}

/// The VM's keys and where it resumes; None when the step cache is off for this VM (the
/// reason noted).
pub(super) fn plan(b: &VmBuild, src: &ResolvedSource, steps: &[Step]) -> Option<VmLayers> {
    if !b.module.opts.step_cache.layers {
        return None;
    }
    let agent = crate::agent_binary::locate().ok().map(|a| a.sha256);
    let keys = match step_cache::vm_keys(b.module.job, b.vm, steps, &src.record, agent.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            b.note(format!("steps are not cached: {e}"));
            return None;
        }
    };
    if let Some(why) = &keys.off {
        b.note(format!("steps are not cached: {why}"));
        return None;
    }
    let store = match LayerStore::new(&b.module.opts.cache) {
        Ok(s) => s,
        Err(e) => {
            b.note(format!("steps are not cached: {e}"));
            return None;
        }
    };
    let disks: Vec<String> = b.vm.disks.iter().map(|d| d.name.clone()).collect();
    let base = src
        .base
        .as_ref()
        .and_then(|base| std::fs::canonicalize(&base.path).ok());
    let resume = if b.module.opts.step_cache.reuse {
        step_cache::find_resume(
            &store,
            &keys,
            steps,
            &Below {
                disks: &disks,
                base: base.as_deref(),
            },
        )
    } else {
        None
    };
    let taken = resume
        .iter()
        .flat_map(|r| &r.layers)
        .map(|(i, k)| LayerRef {
            step: i + 1,
            key: k.clone(),
            reused: true,
        })
        .collect();
    if let Some(r) = &resume {
        b.events().emit(&Event::StepsCached {
            vm: b.vm.name.clone(),
            steps: (0..r.next).collect(),
            layers: r.layers.iter().map(|(_, k)| k.clone()).collect(),
            saved_ms: (r.saved_seconds * 1000.0) as u64,
        });
    }
    Some(VmLayers {
        store,
        keys,
        resume,
        since_layer: Mutex::new(0.0),
        taken: Mutex::new(taken),
    })
}

impl VmLayers {
    /// The layer disk the VM's disk `name` starts over, when resumed.
    pub fn base_of(&self, disk: &str) -> Option<PathBuf> {
        self.resume
            .as_ref()
            .map(|r| step_cache::checkpoint::layer_disk(&r.dir, disk))
    }

    /// The layer's NVRAM, when resumed from a layer that has one.
    pub fn nvram(&self) -> Option<PathBuf> {
        self.resume
            .as_ref()
            .map(|r| r.dir.join(step_cache::store::NVRAM_FILE))
            .filter(|p| p.is_file())
    }

    /// The first step to run.
    pub fn start(&self) -> usize {
        self.resume.as_ref().map_or(0, |r| r.next)
    }

    /// What module.yaml records.
    pub fn record(&self) -> Vec<LayerRef> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How a VM's guest file systems are frozen.
fn freeze_for(b: &VmBuild) -> Freeze {
    match &b.vm.communicator {
        CommunicatorJob::Agent => Freeze::Fsfreeze,
        CommunicatorJob::Ssh(s) => match s.shell {
            StepShell::Bash | StepShell::Sh if s.username == "root" => Freeze::Fsfreeze,
            StepShell::Bash | StepShell::Sh => Freeze::Sudo,
            StepShell::Powershell | StepShell::Cmd => Freeze::No,
        },
    }
}

/// The checkpoints of a VM running with `disks`: None (noted) when the engine serves them
/// where kiln cannot swap them (QEMU's own block layer).
pub(super) fn checkpointer<'a>(
    b: &'a VmBuild,
    layers: &'a VmLayers,
    running: &crate::build::registry::SharedVm,
    disks: &[DiskAttach],
    nvram: Option<PathBuf>,
) -> Option<Checkpointer<'a>> {
    let live = running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .checkpoint_disks();
    let mut out = Vec::new();
    for d in disks.iter().filter(|d| !d.read_only) {
        match live.iter().find(|l| l.path() == d.path) {
            Some(l) => out.push((d.name.clone(), Arc::clone(l))),
            None => {
                b.note(format!(
                    "steps are not cached: the engine serves disk `{}` where kiln cannot \
                     checkpoint it",
                    d.name
                ));
                return None;
            }
        }
    }
    Some(Checkpointer {
        store: &layers.store,
        module: &b.module.job.name,
        vm: &b.vm.name,
        disks: out,
        nvram,
        freeze: freeze_for(b),
    })
}

impl VmLayers {
    /// After step `index` ran for `took`: a checkpoint when the step takes a layer.
    pub fn after_step(
        &self,
        b: &VmBuild,
        cp: Option<&Checkpointer<'_>>,
        steps: &[Step],
        index: usize,
        guest: &mut dyn Guest,
        took: Duration,
    ) -> Result<(), String> {
        let seconds = {
            let mut s = self.since_layer.lock().unwrap_or_else(|p| p.into_inner());
            *s += took.as_secs_f64();
            *s
        };
        let Some(cp) = cp else { return Ok(()) };
        if !self.keys.layered[index] {
            return Ok(());
        }
        let key = &self.keys.keys[index];
        let step = &steps[index];
        let taken = cp
            .take(
                guest,
                key,
                self.keys.parent_of(index),
                StepInfo {
                    number: index + 1,
                    name: &step.name,
                    kind: step.kind.label(),
                    seconds,
                },
            )
            .map_err(|e| e.to_string())?;
        *self.since_layer.lock().unwrap_or_else(|p| p.into_inner()) = 0.0;
        if let Some(why) = &taken.unfrozen {
            b.note(format!(
                "step {} checkpointed without freezing the guest's file systems ({why}): the \
                 layer is what a power cut would leave",
                index + 1
            ));
        }
        b.events().emit(&Event::Checkpoint {
            vm: b.vm.name.clone(),
            index,
            key: key.clone(),
            bytes: taken.bytes,
            frozen_ms: ms(taken.frozen),
            disk_ms: ms(taken.disk),
            duration_ms: ms(taken.total),
            published: taken.published,
        });
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(LayerRef {
                step: index + 1,
                key: key.clone(),
                reused: false,
            });
        Ok(())
    }
}
