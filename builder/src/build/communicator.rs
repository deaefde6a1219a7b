//! How the build reaches a VM's guest: kiln's agent over vsock, or (`communicator.type: ssh`
//! on a guest kiln cannot put its agent into) the guest's own sshd, reached through the
//! module network by a port forward that listens on loopback only.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;

use super::boot::Launched;
use super::error::VmError;
use super::vm::VmBuild;
use crate::guest::{Connector, GuestError, VsockConnector};
use crate::job::{CommunicatorJob, SshJob};
use crate::sources::bootstrap::AGENT_VSOCK_PORT;
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
