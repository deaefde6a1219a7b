//! A running clone's VM, as `kiln run` leaves it: its vsock socket under the runtime folder
//! (`clones/<clone>/<vm>/`), and a connection to the agent behind it. `kiln exec`,
//! `kiln shell` and the terminal of `kiln serve` reach VMs this way. `kiln exec` and
//! `kiln shell` also reach a VM of a running (or paused) build: `<build>/<vm>`, the build
//! named by its module's name or process id as `kiln console` finds it
//! ([`crate::console::find_vm`]), its socket in the build's runtime folder (`<pid>/<vm>/`).

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
    #[error("no running clone or build has a VM named `{0}` (start a clone with `kiln run`)")]
    NoneNamed(String),
    #[error(
        "several running clones or builds have a VM named `{0}`: use <clone>/{0} or <build>/{0}"
    )]
    Ambiguous(String),
    #[error("`{addr}` is not running: no clone's VM there (no {}), nor a build's: {build}", socket.display())]
    Neither {
        addr: String,
        socket: PathBuf,
        #[source]
        build: crate::console::ConsoleError,
    },
    #[error("VM `{vm}` of build `{build}` has not started yet (no {}): try again once it boots", socket.display())]
    BuildVmNotStarted {
        build: String,
        vm: String,
        socket: PathBuf,
    },
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
    clone_socket(&crate::runtime::root()?, clone, vm)
}

fn clone_socket(root: &Path, clone: &str, vm: &str) -> Result<PathBuf, RunningVmError> {
    check_component(clone)?;
    check_component(vm)?;
    let s = crate::engine::vsock_uds(&root.join("clones").join(clone).join(vm));
    if !s.exists() {
        return Err(RunningVmError::NotRunning {
            addr: format!("{clone}/{vm}"),
            socket: s,
        });
    }
    Ok(s)
}

/// Finds a running VM's vsock socket: `clone/vm` or `build/vm` (a running clone first), or a
/// VM name unique among running clones and builds.
pub fn find(addr: &str) -> Result<PathBuf, RunningVmError> {
    find_in(&crate::runtime::root()?, addr)
}

fn find_in(root: &Path, addr: &str) -> Result<PathBuf, RunningVmError> {
    if let Some((c, v)) = addr.split_once('/') {
        return match clone_socket(root, c, v) {
            Err(RunningVmError::NotRunning { addr, socket }) => {
                build_socket(root, &addr).map_err(|e| match e {
                    RunningVmError::Neither { build, .. } => RunningVmError::Neither {
                        addr,
                        socket,
                        build,
                    },
                    e => e,
                })
            }
            r => r,
        };
    }
    check_component(addr)?;
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root.join("clones")) {
        for e in rd.flatten() {
            hits.push(crate::engine::vsock_uds(&e.path().join(addr)));
        }
    }
    for (pid, rec) in crate::console::running_builds(root) {
        if rec.vms.iter().any(|v| v.name == addr) {
            hits.push(crate::engine::vsock_uds(
                &root.join(pid.to_string()).join(addr),
            ));
        }
    }
    hits.retain(|s| s.exists());
    match hits.len() {
        0 => Err(RunningVmError::NoneNamed(addr.into())),
        1 => Ok(hits.remove(0)),
        _ => Err(RunningVmError::Ambiguous(addr.into())),
    }
}

/// The vsock socket of a VM of a running build: `build/vm`, whose names are checked.
fn build_socket(root: &Path, addr: &str) -> Result<PathBuf, RunningVmError> {
    let (pid, rec, vm) =
        crate::console::find_vm(root, addr).map_err(|build| RunningVmError::Neither {
            addr: addr.into(),
            socket: PathBuf::new(),
            build,
        })?;
    let s = crate::engine::vsock_uds(&root.join(pid.to_string()).join(vm));
    if !s.exists() {
        return Err(RunningVmError::BuildVmNotStarted {
            build: rec.module,
            vm: vm.into(),
            socket: s,
        });
    }
    Ok(s)
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
        let root = tempfile::tempdir().unwrap();
        for bad in ["../x/vm", "b/..", "b/.x", "b/a b"] {
            assert!(
                matches!(find_in(root.path(), bad), Err(RunningVmError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    /// A running build's folder, locked as its build holds it, with VM `vm` started.
    fn running_build(root: &Path, pid: u32, module: &str, vm: &str) -> crate::leftovers::OwnerLock {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join(vm)).unwrap();
        let rec = crate::console::BuildRecord {
            module: module.into(),
            vms: vec![crate::console::VmEntry {
                name: vm.into(),
                invisible: false,
            }],
        };
        std::fs::write(
            dir.join(crate::console::RECORD),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        std::fs::write(crate::engine::vsock_uds(&dir.join(vm)), b"").unwrap();
        crate::leftovers::OwnerLock::hold(&dir).unwrap()
    }

    #[test]
    fn a_build_vm_is_found_by_module_name_or_pid_and_a_clone_comes_first() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let _web = running_build(root, 4001, "site", "web");
        let build_sock = crate::engine::vsock_uds(&root.join("4001/web"));
        assert_eq!(find_in(root, "site/web").unwrap(), build_sock);
        assert_eq!(find_in(root, "4001/web").unwrap(), build_sock);
        assert_eq!(find_in(root, "web").unwrap(), build_sock);
        let msg = find_in(root, "site/db").unwrap_err().to_string();
        assert!(msg.contains("build `site` has no VM named `db`"), "{msg}");
        let msg = find_in(root, "other/web").unwrap_err().to_string();
        assert!(
            msg.contains("`other/web` is not running: no clone's VM there")
                && msg.contains("no running build is named `other`"),
            "{msg}"
        );
        // A clone of the same name is what `site/web` names first; a bare `web` is ambiguous.
        let clone_vm = root.join("clones/site/web");
        std::fs::create_dir_all(&clone_vm).unwrap();
        std::fs::write(crate::engine::vsock_uds(&clone_vm), b"").unwrap();
        assert_eq!(
            find_in(root, "site/web").unwrap(),
            crate::engine::vsock_uds(&clone_vm)
        );
        assert!(matches!(
            find_in(root, "web"),
            Err(RunningVmError::Ambiguous(_))
        ));
    }

    #[test]
    fn a_build_vm_not_started_and_an_ended_build_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let lock = running_build(root, 4002, "site", "web");
        std::fs::remove_file(crate::engine::vsock_uds(&root.join("4002/web"))).unwrap();
        let msg = find_in(root, "site/web").unwrap_err().to_string();
        assert!(msg.contains("has not started yet"), "{msg}");
        // A build whose kiln ended (its folder no longer locked) is not running.
        drop(lock);
        let msg = find_in(root, "site/web").unwrap_err().to_string();
        assert!(msg.contains("no build is running"), "{msg}");
    }
}
