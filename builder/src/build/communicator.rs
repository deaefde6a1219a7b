//! How the build reaches a VM's guest: kiln's agent over vsock, or (`communicator.type: ssh`
//! on a guest kiln cannot put its agent into) the guest's own sshd, reached through the
//! module network by a port forward that listens on loopback only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_agent::cloud_init;

use super::boot::Launched;
use super::error::VmError;
use super::vm::VmBuild;
use crate::events::Stream;
use crate::guest::{Connector, Guest, GuestCommand, GuestError, VsockConnector};
use crate::job::{CommunicatorJob, SshJob, StepShell};
use crate::sources::bootstrap::{AgentFiles, AGENT_VSOCK_PORT};
use crate::ssh::{Login, SshConnector};

/// A VM's connector, whichever it is.
pub(super) enum Communicator<'a> {
    Agent(VsockConnector),
    Ssh(SshConnector<'a>),
}

impl Communicator<'_> {
    pub(super) fn connector(&self) -> &dyn Connector {
        match self {
            Communicator::Agent(c) => c,
            Communicator::Ssh(c) => c,
        }
    }

    /// A boot wait that ran out, told as the SSH wait it was (the agent's says so itself).
    pub(super) fn explain_wait(&self, e: VmError, limit: std::time::Duration) -> VmError {
        match (self, e) {
            (Communicator::Ssh(_), VmError::NoAgent { error, serial })
                if !matches!(error, GuestError::Refused(_)) =>
            {
                VmError::NoAgent {
                    error: GuestError::NotAvailable(format!(
                        "the guest's sshd did not let kiln log in within {} (sshTimeout); the last try: {error}",
                        crate::manifest::units::format_duration(limit)
                    )),
                    serial,
                }
            }
            (_, e) => e,
        }
    }

    /// The guest configures its own network (an installed system's DHCP client): the
    /// handover of the build network's addresses is a request of kiln's agent.
    pub(super) fn takes_handover(&self) -> bool {
        matches!(self, Communicator::Agent(_))
    }
}

pub(super) fn for_vm<'a>(b: &'a VmBuild, vm: &Launched) -> Result<Communicator<'a>, VmError> {
    match &b.vm.communicator {
        CommunicatorJob::Agent => Ok(Communicator::Agent(VsockConnector::new(
            &vm.socket,
            AGENT_VSOCK_PORT,
        ))),
        CommunicatorJob::Ssh(job) => ssh(b, job).map(Communicator::Ssh),
    }
}

fn refused(msg: String) -> VmError {
    VmError::NoAgent {
        error: GuestError::Refused(msg),
        serial: String::new(),
    }
}

fn ssh<'a>(b: &'a VmBuild, job: &SshJob) -> Result<SshConnector<'a>, VmError> {
    let login = Login::from_job(job).map_err(|e| refused(e.to_string()))?;
    let Some(nic) = b.vm.nics.first() else {
        return Err(refused(format!(
            "SSH: VM `{}` has no NIC to reach its sshd through",
            b.vm.name
        )));
    };
    let mac = nic.mac.bytes();
    let port = job.port;
    let net = b.module.net;
    let forward: Mutex<Option<SocketAddr>> = Mutex::new(None);
    // Made once the guest holds a lease: the forward needs its address.
    let address = Box::new(move || {
        let mut fwd = forward.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = *fwd {
            return Ok(a);
        }
        let lease = net
            .lease(mac)
            .map_err(|e| GuestError::Agent(format!("the build network: {e}")))?
            .ok_or_else(|| {
                GuestError::NotAvailable("SSH: the guest has no DHCP lease yet".into())
            })?;
        let a = net
            .add_port_forward(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                lease.address,
                port,
            )
            .map_err(|e| {
                GuestError::Agent(format!("forwarding a port to the guest's sshd: {e}"))
            })?;
        *fwd = Some(a);
        Ok(a)
    });
    let user = job.username.clone();
    let on_host_key = Box::new(move |fp: &str| {
        b.note(format!(
            "SSH: logged in as `{user}`; the guest's host key is {fp} (accepted as the first seen; \
             another one later is refused)"
        ))
    });
    SshConnector::new(address, login, on_host_key)
        .map_err(|e| refused(format!("SSH: starting its runtime: {e}")))
}

/// How long kiln's agent may take to answer over vsock once started over SSH (it loads the
/// vsock transport module itself).
const AGENT_START: Duration = Duration::from_secs(60);

/// Starts the agent kiln uploaded, with the guest's systemd; a guest without it keeps SSH.
const START_AGENT: &str = "set -e
[ -d /run/systemd/system ] || { echo 'the guest does not run systemd' >&2; exit 3; }
systemctl daemon-reload
systemctl enable kiln-agent.service
systemctl start --no-block kiln-agent.service
";

impl Communicator<'_> {
    /// Over SSH, as root on a Linux guest: kiln's agent is uploaded, started as a systemd
    /// unit, and the build goes on through it over vsock. Commands cost the same either way
    /// (0.2 s a step under TCG) but files are faster (20 MB: 1.8 s against 4.3 s over SFTP),
    /// the template cleanup is the agent's, and the captured disk carries the agent, so clones
    /// take `kiln run`/`kiln exec`. Returns the session to go on with and whether it is the
    /// agent's; when the agent cannot be installed, the SSH session with a note.
    pub(super) fn install_agent(
        &mut self,
        b: &VmBuild,
        vm: &Launched,
        mut guest: Box<dyn Guest>,
    ) -> (Box<dyn Guest>, bool) {
        let CommunicatorJob::Ssh(job) = &b.vm.communicator else {
            return (guest, true);
        };
        if job.username != "root" || !matches!(job.shell, StepShell::Bash | StepShell::Sh) {
            b.note(
                "SSH: the steps stay on SSH (kiln installs its agent only when it logs in as root \
                 to a Linux guest)"
                    .into(),
            );
            return (guest, false);
        }
        let start = Instant::now();
        if let Err(why) = put_agent(&mut *guest) {
            b.note(format!(
                "SSH: kiln's agent could not be installed ({why}): the steps stay on SSH"
            ));
            return (guest, false);
        }
        let agent = VsockConnector::new(&vm.socket, AGENT_VSOCK_PORT);
        match agent.connect_until(AGENT_START, &b.module.ctx.cancel, &mut |_| Ok(())) {
            Ok(g) => {
                b.note(format!(
                    "SSH: kiln's agent installed over SSH and answering over vsock after {:.1}s: \
                     the remaining steps go through it",
                    start.elapsed().as_secs_f64()
                ));
                *self = Communicator::Agent(agent);
                (g, true)
            }
            Err(e) => {
                b.note(format!(
                    "SSH: kiln's agent was installed but did not answer over vsock ({}): the \
                     steps stay on SSH",
                    GuestError::from(e)
                ));
                (guest, false)
            }
        }
    }
}

/// Uploads the static agent and its unit, and starts it.
fn put_agent(g: &mut dyn Guest) -> Result<(), String> {
    let files = AgentFiles::locate().map_err(|e| e.to_string())?;
    let bin = std::fs::read(&files.binary)
        .map_err(|e| format!("reading {}: {e}", files.binary.display()))?;
    g.put_file(cloud_init::GUEST_BINARY, &bin, 0o755)
        .map_err(|e| e.to_string())?;
    g.put_file(
        cloud_init::GUEST_UNIT,
        cloud_init::SYSTEMD_UNIT.as_bytes(),
        0o644,
    )
    .map_err(|e| e.to_string())?;
    let mut err = Vec::new();
    let st = g
        .exec(
            &GuestCommand::Bash(START_AGENT.into()),
            &BTreeMap::new(),
            Some(AGENT_START),
            &mut |s, d| {
                if s == Stream::Stderr && err.len() < 4096 {
                    err.extend_from_slice(d)
                }
            },
        )
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!(
            "starting it: {st}: {}",
            String::from_utf8_lossy(&err).trim()
        ));
    }
    Ok(())
}
