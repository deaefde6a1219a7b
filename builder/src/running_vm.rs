//! A running clone's VM, as `kiln run` leaves it: its vsock socket under the runtime folder
//! (`clones/<clone>/<vm>/`), and a connection to the agent behind it. `kiln exec`,
//! `kiln shell` and the terminal of `kiln serve` reach VMs this way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runtime::RuntimeDirError;

#[derive(Debug, thiserror::Error)]
pub enum RunningVmError {
    #[error(transparent)]
    Runtime(#[from] RuntimeDirError),
    #[error("`{0}` is not a clone or VM name")]
    BadName(String),
    #[error("`{addr}` is not running (no {})", socket.display())]
    NotRunning { addr: String, socket: PathBuf },
    #[error("no running clone has a VM named `{0}` (start one with `kiln run`)")]
    NoneNamed(String),
    #[error("several running clones have a VM named `{0}`: use <clone>/{0}")]
    Ambiguous(String),
    #[error("reaching the agent at {}: {source}", socket.display())]
    Agent {
        socket: PathBuf,
        #[source]
        source: kiln_agent::ClientError,
    },
}

/// Whether `name` can be one path component under the runtime folder (names come from
/// the command line and from requests to `kiln serve`).
fn check_component(name: &str) -> Result<(), RunningVmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RunningVmError::BadName(name.into()))
    }
}

/// The vsock socket of VM `vm` of the running clone `clone`.
pub fn socket(clone: &str, vm: &str) -> Result<PathBuf, RunningVmError> {
    check_component(clone)?;
    check_component(vm)?;
    let root = crate::runtime::root()?.join("clones");
    let s = crate::engine::vsock_uds(&root.join(clone).join(vm));
    if !s.exists() {
        return Err(RunningVmError::NotRunning {
            addr: format!("{clone}/{vm}"),
            socket: s,
        });
    }
    Ok(s)
}

/// Finds a running VM's vsock socket: `clone/vm`, or a VM name unique among running clones.
pub fn find(addr: &str) -> Result<PathBuf, RunningVmError> {
    if let Some((c, v)) = addr.split_once('/') {
        return socket(c, v);
    }
    check_component(addr)?;
    let root = crate::runtime::root()?.join("clones");
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let s = crate::engine::vsock_uds(&e.path().join(addr));
            if s.exists() {
                hits.push(s);
            }
        }
    }
    match hits.len() {
        0 => Err(RunningVmError::NoneNamed(addr.into())),
        1 => Ok(hits.remove(0)),
        _ => Err(RunningVmError::Ambiguous(addr.into())),
    }
}

/// Connects to the agent behind `sock`, retrying for `wait` while the guest boots.
pub fn connect(sock: &Path, wait: Duration) -> Result<kiln_agent::Client, RunningVmError> {
    let port = kiln_agent::VSOCK_PORT;
    kiln_agent::Client::connect_when_ready(
        || kiln_agent::Client::connect_vsock_uds(sock, port, Duration::from_secs(5)),
        wait,
    )
    .map_err(|source| RunningVmError::Agent {
        socket: sock.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_runtime_folder() {
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\0"] {
            assert!(check_component(bad).is_err(), "{bad:?}");
        }
        for good in ["web", "hello-1", "db_2", "a.b"] {
            assert!(check_component(good).is_ok(), "{good:?}");
        }
        assert!(matches!(
            socket("..", "vm"),
            Err(RunningVmError::BadName(_))
        ));
    }
}
