//! Provision: the VM's steps run in order through its agent (see [`crate::provision`]), with
//! the `httpDirectory` address in shell steps' environment, `files` URLs read through the
//! build's cache; a checkpoint of the step cache after each step; under `--on-error ask` the
//! user asked at a failed step.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use std::time::Duration;

use super::ask::TerminalAsk;
use super::error::VmError;
use super::layers::VmLayers;
use super::options::OnError;
use super::vm::VmBuild;
use crate::guest::{Connector, Guest};
use crate::http_directory;
use crate::job::Step;
use crate::provision::{Provisioner, StepFailure};
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
    socket: &Path,
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
    let ask = TerminalAsk {
        events: b.events(),
        cancel: &b.module.ctx.cancel,
        socket: socket.to_path_buf(),
    };
    let ask = |f: &StepFailure| ask.ask(f);
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
        on_failure: (b.module.opts.on_error == OnError::Ask).then_some(&ask),
    };
    Ok(prov.run(guest)?)
}
