//! Provision: the VM's steps run in order through its agent (see [`crate::provision`]), with
//! the `httpDirectory` address in shell steps' environment and `files` URLs read through the
//! build's cache.

use std::fs::File;
use std::sync::Mutex;

use super::error::VmError;
use super::vm::VmBuild;
use crate::guest::{Connector, Guest};
use crate::http_directory;
use crate::provision::Provisioner;
use crate::sources::url;

/// Runs the steps on `guest`; returns the session the shutdown goes on with (a new one
/// after a reboot step).
pub(super) fn run(
    b: &VmBuild,
    guest: Box<dyn Guest>,
    connector: &dyn Connector,
    log: &Mutex<File>,
    network_ready: &dyn Fn(&mut dyn Guest),
) -> Result<Box<dyn Guest>, VmError> {
    let cache = b.module.opts.cache.clone();
    let fetch = move |u: &str| url::fetch_bytes(&cache, u);
    // `httpDirectory`: shell steps are told where the files are (their first NIC's gateway).
    let steps = match b
        .vm
        .nics
        .first()
        .and_then(|n| b.module.net.gateway(&n.subnet))
    {
        Some(gw) if !b.module.job.http_directory.is_empty() => {
            http_directory::with_env(&b.vm.steps, &http_directory::step_env(gw))
        }
        _ => b.vm.steps.clone(),
    };
    let prov = Provisioner {
        vm: &b.vm.name,
        steps: &steps,
        files: &b.module.job.files,
        connector,
        events: b.events(),
        log: Some(log),
        cancel: b.module.ctx.cancel.clone(),
        resume_flag: b.runtime_dir().join("resume"),
        fetch_url: &fetch,
        network_ready,
    };
    Ok(prov.run(guest)?)
}
