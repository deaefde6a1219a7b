//! The consoles of running builds: which build VM has a VNC display, where its socket is and
//! its one-time password. `kiln console` and `kiln serve` read them here.
//!
//! A build writes [`RECORD`] into its runtime folder (`<root>/<pid>/`) as it starts: the
//! module's name and each VM's name and `invisible` flag. Each VM's engine then puts
//! `vnc.sock` and `vnc.pass` into the VM's folder (`<root>/<pid>/<vm>/`, see
//! [`crate::engine::qemu::vnc`]) when it has a console.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::qemu::{vnc_password_file, vnc_socket};
use crate::job::BuildJob;
use crate::path_io::PathIoError;

/// The file in a build's runtime folder that names its module and VMs.
pub const RECORD: &str = "build.json";

/// Largest [`RECORD`] read: a module's name and its VMs' names.
const MAX_RECORD: u64 = 1 << 20;

/// What a running build tells `kiln console` about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub module: String,
    pub vms: Vec<VmEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    pub name: String,
    /// `invisible: true`: no console, in no view.
    #[serde(default)]
    pub invisible: bool,
}

impl BuildRecord {
    /// What a build of `job` records.
    pub fn of(job: &BuildJob) -> BuildRecord {
        BuildRecord {
            module: job.name.clone(),
            vms: job
                .vms
                .iter()
                .map(|v| VmEntry {
                    name: v.name.clone(),
                    invisible: v.invisible,
                })
                .collect(),
        }
    }
}

/// Writes the build's [`RECORD`] into its runtime folder `run_dir`.
pub fn record(run_dir: &Path, job: &BuildJob) -> Result<(), PathIoError> {
    let rec = BuildRecord::of(job);
    let path = run_dir.join(RECORD);
    let text = serde_json::to_vec(&rec).unwrap_or_default();
    std::fs::write(&path, text).map_err(PathIoError::at("writing", &path))
}

/// A VM's console, ready to attach to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Console {
    /// The module the build makes.
    pub build: String,
    /// The build's process.
    pub pid: u32,
    pub vm: String,
    /// QEMU's VNC server.
    pub socket: PathBuf,
    /// VNC authentication's password, made for this VM start.
    pub password: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("no build is running (none in {0})")]
    NoBuilds(PathBuf),
    #[error("no running build has a VM named `{vm}` (running: {running})")]
    NoVm { vm: String, running: String },
    #[error("no running build is named `{build}` (running: {running})")]
    NoBuild { build: String, running: String },
    #[error(
        "several running builds have a VM named `{vm}` ({builds}): name one, as `<build>/{vm}`"
    )]
    Ambiguous { vm: String, builds: String },
    #[error("build `{build}` has no VM named `{vm}` (its VMs: {vms})")]
    NotInBuild {
        build: String,
        vm: String,
        vms: String,
    },
    #[error("VM `{vm}` of build `{build}` is `invisible: true`: it is kept out of every console")]
    Invisible { build: String, vm: String },
    #[error("VM `{vm}` of build `{build}` has not started yet: try again once it boots")]
    NotStarted { build: String, vm: String },
    #[error(
        "VM `{vm}` of build `{build}` has no screen: it runs on the kvm engine, which has \
         none (a build with `--engine qemu` gives every VM one)"
    )]
    NoScreen { build: String, vm: String },
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// The builds running now under the runtime folder `root`, with their process ids: those
/// whose folder is locked by a live kiln and that wrote a readable [`RECORD`].
pub fn running_builds(root: &Path) -> Vec<(u32, BuildRecord)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, BuildRecord)> = rd
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path();
            // A killed build's folder stays until the next start-up clean-up.
            if !crate::leftovers::is_owned(&dir) {
                return None;
            }
            Some((pid, read_record(&dir.join(RECORD))?))
        })
        .collect();
    out.sort_by_key(|(pid, _)| *pid);
    out
}

fn read_record(path: &Path) -> Option<BuildRecord> {
    let f = std::fs::File::open(path).ok()?;
    let mut text = Vec::new();
    f.take(MAX_RECORD).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The console of `target`, `<build>/<vm>` or a `<vm>` only one running build has; `<build>`
/// is the module's name or the build's process id.
pub fn find(root: &Path, target: &str) -> Result<Console, ConsoleError> {
    let (pid, rec, vm) = find_vm(root, target)?;
    console_of(root, pid, &rec, vm)
}

/// The running build (its process id and record) that `target` names a VM of, as [`find`]
/// reads it, and the VM's name.
pub fn find_vm<'t>(
    root: &Path,
    target: &'t str,
) -> Result<(u32, BuildRecord, &'t str), ConsoleError> {
    let (build, vm) = match target.split_once('/') {
        Some((b, v)) => (Some(b), v),
        None => (None, target),
    };
    let builds = running_builds(root);
    if builds.is_empty() {
        return Err(ConsoleError::NoBuilds(root.to_path_buf()));
    }
    let running = || {
        builds
            .iter()
            .map(|(pid, b)| format!("{} (pid {pid})", b.module))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let named: Vec<&(u32, BuildRecord)> = match build {
        Some(name) => {
            let hits: Vec<_> = builds
                .iter()
                .filter(|(pid, b)| b.module == name || pid.to_string() == name)
                .collect();
            if hits.is_empty() {
                return Err(ConsoleError::NoBuild {
                    build: name.into(),
                    running: running(),
                });
            }
            hits
        }
        None => builds.iter().collect(),
    };
    let with_vm: Vec<_> = named
        .iter()
        .filter(|(_, b)| b.vms.iter().any(|v| v.name == vm))
        .collect();
    let (pid, rec) = match (with_vm.as_slice(), build) {
        ([one], _) => (one.0, &one.1),
        ([], Some(_)) => {
            let (_, b) = named[0];
            return Err(ConsoleError::NotInBuild {
                build: b.module.clone(),
                vm: vm.into(),
                vms: b
                    .vms
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        ([], None) => {
            return Err(ConsoleError::NoVm {
                vm: vm.into(),
                running: running(),
            })
        }
        (many, _) => {
            return Err(ConsoleError::Ambiguous {
                vm: vm.into(),
                builds: many
                    .iter()
                    .map(|(pid, b)| format!("{} (pid {pid})", b.module))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    Ok((pid, rec.clone(), vm))
}

/// The console of VM `vm` of the build `rec` run by process `pid`.
pub fn console_of(
    root: &Path,
    pid: u32,
    rec: &BuildRecord,
    vm: &str,
) -> Result<Console, ConsoleError> {
    let (build, name) = (rec.module.clone(), vm.to_string());
    if rec.vms.iter().any(|v| v.name == vm && v.invisible) {
        return Err(ConsoleError::Invisible { build, vm: name });
    }
    let dir = root.join(pid.to_string()).join(vm);
    if !dir.is_dir() {
        return Err(ConsoleError::NotStarted { build, vm: name });
    }
    let pass = vnc_password_file(&dir);
    let password = match std::fs::File::open(&pass) {
        Ok(f) => {
            let mut s = String::new();
            // Bounded: the file is kiln's, but the folder could hold anything.
            f.take(64)
                .read_to_string(&mut s)
                .map_err(PathIoError::at("reading", &pass))?;
            s.trim().to_string()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConsoleError::NoScreen { build, vm: name })
        }
        Err(e) => return Err(PathIoError::new("reading", &pass, e).into()),
    };
    // The password is written just before QEMU starts and makes the socket.
    let socket = vnc_socket(&dir);
    if !socket.exists() {
        return Err(ConsoleError::NotStarted { build, vm: name });
    }
    Ok(Console {
        build,
        pid,
        vm: name,
        socket,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running build's folder as a build leaves it: locked, with its record.
    struct FakeBuild {
        _lock: crate::leftovers::OwnerLock,
    }

    fn build(root: &Path, pid: u32, module: &str, vms: &[(&str, bool)]) -> FakeBuild {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let rec = BuildRecord {
            module: module.into(),
            vms: vms
                .iter()
                .map(|(n, invisible)| VmEntry {
                    name: (*n).into(),
                    invisible: *invisible,
                })
                .collect(),
        };
        std::fs::write(dir.join(RECORD), serde_json::to_vec(&rec).unwrap()).unwrap();
        FakeBuild {
            _lock: crate::leftovers::OwnerLock::hold(&dir).unwrap(),
        }
    }

    fn started(root: &Path, pid: u32, vm: &str, password: Option<&str>) {
        let dir = root.join(pid.to_string()).join(vm);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(p) = password {
            std::fs::write(vnc_password_file(&dir), p).unwrap();
            std::fs::write(vnc_socket(&dir), b"").unwrap();
        }
    }

    #[test]
    fn a_vm_is_found_by_build_and_name_or_by_name_alone() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let _a = build(root, 100, "lab", &[("web", false), ("db", false)]);
        let _b = build(root, 200, "other", &[("web", false), ("gw", true)]);
        started(root, 100, "web", Some("pAss2345"));
        started(root, 200, "web", Some("xyzXYZ23"));
        let c = find(root, "lab/web").unwrap();
        assert_eq!(c.build, "lab");
        assert_eq!(c.pid, 100);
        assert_eq!(c.password, "pAss2345");
        assert_eq!(c.socket, root.join("100/web/vnc.sock"));
        // The build's process id names it too.
        assert_eq!(find(root, "200/web").unwrap().password, "xyzXYZ23");
        // A name two builds have must say which.
        let e = find(root, "web").unwrap_err().to_string();
        assert!(
            e.contains("several running builds") && e.contains("lab (pid 100)"),
            "{e}"
        );
        let e = find(root, "db").unwrap_err().to_string();
        assert!(e.contains("not started yet"), "{e}");
        // The password is there, QEMU has not made its socket yet.
        started(root, 100, "db", None);
        std::fs::write(vnc_password_file(&root.join("100/db")), "pAss2345").unwrap();
        let e = find(root, "db").unwrap_err().to_string();
        assert!(e.contains("not started yet"), "{e}");
        let e = find(root, "lab/gw").unwrap_err().to_string();
        assert!(
            e.contains("build `lab` has no VM named `gw` (its VMs: web, db)"),
            "{e}"
        );
        let e = find(root, "nope/web").unwrap_err().to_string();
        assert!(e.contains("no running build is named `nope`"), "{e}");
        let e = find(root, "nothing").unwrap_err().to_string();
        assert!(
            e.contains("no running build has a VM named `nothing`"),
            "{e}"
        );
    }

    #[test]
    fn invisible_vms_and_vms_without_a_screen_have_no_console() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let _a = build(root, 100, "lab", &[("gw", true), ("fast", false)]);
        // Even with a screen's files there (an invisible VM has a screen for boot commands).
        started(root, 100, "gw", Some("pAss2345"));
        started(root, 100, "fast", None);
        let e = find(root, "lab/gw").unwrap_err();
        assert!(matches!(e, ConsoleError::Invisible { .. }), "{e}");
        assert!(e.to_string().contains("invisible: true"), "{e}");
        let e = find(root, "fast").unwrap_err();
        assert!(matches!(e, ConsoleError::NoScreen { .. }), "{e}");
        assert!(e.to_string().contains("kvm engine"), "{e}");
    }

    #[test]
    fn ended_builds_are_not_running() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        drop(build(root, 100, "lab", &[("web", false)]));
        started(root, 100, "web", Some("pAss2345"));
        // Not a build's folder at all.
        std::fs::create_dir(root.join("clones")).unwrap();
        assert!(running_builds(root).is_empty());
        let e = find(root, "web").unwrap_err();
        assert!(matches!(e, ConsoleError::NoBuilds(_)), "{e}");
    }
}
