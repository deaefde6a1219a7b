//! Provision: the VM's steps run in order through its agent (see [`crate::provision`]), with
//! the `httpDirectory` address in shell steps' environment and `files` URLs read through the
//! build's cache; a checkpoint of the step cache after each step.

use std::fs::File;
use std::sync::Mutex;

use std::time::Duration;

use super::error::VmError;
use super::layers::VmLayers;
use super::vm::VmBuild;
use crate::guest::{Connector, Guest};
use crate::http_directory;
use crate::job::Step;
use crate::provision::Provisioner;
use crate::sources::url;
use crate::step_cache::Checkpointer;

/// The VM's steps as they run: with the `httpDirectory` address in shell steps' environment
/// (their first NIC's gateway).
pub(super) fn steps_as_run(b: &VmBuild) -> Vec<Step> {
    match b
        .vm
        .nics
        .first()
        .and_then(|n| b.module.net.gateway(&n.subnet))
    {
        Some(gw) if !b.module.job.http_directory.is_empty() => {
            http_directory::with_env(&b.vm.steps, &http_directory::step_env(gw))
        }
        _ => b.vm.steps.clone(),
    }
}

/// Runs `steps` (from the step cache's first step to run) on `guest`, with a checkpoint
/// after each that takes a layer; returns the session the shutdown goes on with (a new one
/// after a reboot step).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    b: &VmBuild,
    steps: &[Step],
    guest: Box<dyn Guest>,
    connector: &dyn Connector,
    log: &Mutex<File>,
    network_ready: &dyn Fn(&mut dyn Guest),
    layers: Option<&VmLayers>,
    checkpoints: Option<&Checkpointer<'_>>,
) -> Result<Box<dyn Guest>, VmError> {
    let cache = b.module.opts.cache.clone();
    let fetch = move |u: &str| url::fetch_bytes(&cache, u);
    let after_step = |index: usize, g: &mut dyn Guest, took: Duration| match layers {
        Some(l) => l.after_step(b, checkpoints, steps, index, g, took),
        None => Ok(()),
    };
    let prov = Provisioner {
        vm: &b.vm.name,
        steps,
        files: &b.module.job.files,
        connector,
        events: b.events(),
        log: Some(log),
        cancel: b.module.ctx.cancel.clone(),
        resume_flag: b.runtime_dir().join("resume"),
        fetch_url: &fetch,
        network_ready,
        start: layers.map_or(0, VmLayers::start),
        after_step: &after_step,
    };
    Ok(prov.run(guest)?)
}
