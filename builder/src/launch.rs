//! Starting one VM on its module network and handing its guest the addresses kiln gave its
//! NICs: what a build does for each VM it boots, and `kiln run` for each VM of a clone.

use std::path::PathBuf;
use std::time::Duration;

use kiln_agent::LinkConfig;

use crate::engine::{BootMode, DiskAttach, Engine, EngineError, RunningVm, VmLaunch};
use crate::guest::{Connector, Guest, GuestError};
use crate::job::NicJob;
use crate::network as modnet;

/// One VM to start: what a build's VM and a clone's VM each give.
pub struct VmStart<'a> {
    pub name: &'a str,
    pub cpus: u32,
    pub memory_mib: u64,
    pub boot: BootMode,
    /// The first is the boot disk.
    pub disks: Vec<DiskAttach>,
    /// Plugged into the module network, in slot order.
    pub nics: &'a [NicJob],
    /// Sockets, pid files and flags go here.
    pub workdir: PathBuf,
    /// The guest's serial console is appended to this file (the caller makes it, 0600).
    pub serial_log: PathBuf,
    /// The VM's place among its module's VMs: it gives the VM its vsock context id.
    pub index: usize,
    /// CD-ROMs, a floppy, a screen (build VMs of ISO installs).
    pub peripherals: crate::engine::Peripherals,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A NIC could not be plugged into the module network.
    #[error(transparent)]
    Nics(EngineError),
    /// The engine could not start the VM.
    #[error(transparent)]
    Engine(EngineError),
}

/// Context ids 0-2 are the hypervisor's and the host's.
const FIRST_GUEST_CID: u32 = 3;

/// Plugs the VM's NICs into `net` (none without a network) and starts it on `engine`.
pub fn start(
    engine: &dyn Engine,
    net: Option<&kiln_net::Network>,
    spec: VmStart<'_>,
) -> Result<Box<dyn RunningVm>, LaunchError> {
    let nics = match net {
        Some(net) => modnet::attach(net, spec.name, spec.nics).map_err(LaunchError::Nics)?,
        None => Vec::new(),
    };
    let launch = VmLaunch {
        name: spec.name.to_string(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        boot: spec.boot,
        cmdline_extra: vec![],
        disks: spec.disks,
        workdir: spec.workdir,
        serial_log: spec.serial_log,
        cid: FIRST_GUEST_CID + spec.index as u32,
        nics,
        peripherals: spec.peripherals,
    };
    engine.launch(&launch).map_err(LaunchError::Engine)
}

/// How long opening a session of its own for the handover may take (the agent already
/// answered on another session).
const HANDOVER_CONNECT: Duration = Duration::from_secs(10);

/// Hands `links` (bound leases, static addresses) to the guest's agent: on `guest`'s session
/// when the agent knows the request, else on a session of its own, as an older agent may
/// close the session on a request it does not know.
pub fn hand_over(
    connector: &dyn Connector,
    guest: &mut dyn Guest,
    links: &[LinkConfig],
) -> Result<(), GuestError> {
    if guest.takes_net_config() {
        guest.net_config(links)
    } else {
        connector
            .connect(HANDOVER_CONNECT)
            .and_then(|mut g| g.net_config(links))
    }
}
