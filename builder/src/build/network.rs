//! The module's network: one isolated network per build, with `buildOverrides` applied, and
//! the `httpDirectory` files served on it.

use std::path::Path;

use super::error::BuildError;
use super::options::BuildOptions;
use crate::events::{Event, EventSink};
use crate::http_directory;
use crate::job::BuildJob;
use crate::network::{self as modnet, Internet};
use crate::sources::url;

/// Starts the build's network; its thread stops when the returned network drops.
pub(super) fn start(
    job: &BuildJob,
    opts: &BuildOptions,
    ev: &dyn EventSink,
) -> Result<kiln_net::Network, BuildError> {
    let net = modnet::start(&job.network, opts.internet)?;
    for s in &job.network.subnets {
        let internet = job
            .network
            .vpcs
            .iter()
            .any(|v| v.name == s.vpc && v.internet)
            && opts.internet == Internet::AsDeclared;
        ev.emit(&Event::Note {
            vm: None,
            message: format!(
                "network: subnet {} {} in VPC {}, gateway {}{}, internet {}",
                s.name,
                s.cidr,
                s.vpc,
                net.gateway(&s.name)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                if s.dhcp && !s.unmanaged {
                    " (DHCP, DNS)"
                } else {
                    ""
                },
                if internet { "on" } else { "off" }
            ),
        });
    }
    Ok(net)
}

/// Serves the `httpDirectory` files at every gateway, from a folder under `run_dir`.
pub(super) fn serve_http_directory(
    job: &BuildJob,
    opts: &BuildOptions,
    net: &kiln_net::Network,
    run_dir: &Path,
    ev: &dyn EventSink,
) -> Result<(), BuildError> {
    if job.http_directory.is_empty() {
        return Ok(());
    }
    let cache = opts.cache.clone();
    http_directory::serve(
        net,
        &job.http_directory,
        &job.files,
        &run_dir.join("http"),
        &move |u: &str| url::fetch_bytes(&cache, u),
    )?;
    ev.emit(&Event::Note {
        vm: None,
        message: format!(
            "httpDirectory: {} served at http://<gateway>:{}/<name> (steps get KILN_HTTP_ADDR and PACKER_HTTP_ADDR)",
            job.http_directory.join(", "),
            http_directory::PORT
        ),
    });
    Ok(())
}
