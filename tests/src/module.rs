//! A built module used the way a user uses it after `kiln build`: `kiln clone`, `kiln run` of
//! the first clone in the background, and `kiln exec` of a command in one of its VMs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::{KitError, Result};

/// How long `kiln run` may take to bind the VM's sockets (it does so before the VM starts).
const SOCKET_WAIT: Duration = Duration::from_secs(60);

/// What to clone, run and exec in.
#[derive(Debug, Clone, Copy)]
pub struct CloneExec<'a> {
    /// The `kiln` binary.
    pub kiln: &'a Path,
    /// The module's name, in `modules`.
    pub module: &'a str,
    pub modules: &'a Path,
    /// Where the clones go (`--clones`).
    pub clones: &'a Path,
    /// `--count` for `kiln clone` (None: kiln's default, one clone).
    pub count: Option<u32>,
    /// The VM of the first clone (`<module>-1`) the command runs in.
    pub vm: &'a str,
    /// `KILN_RUN_DIR` of the run: where its sockets are.
    pub run_dir: &'a Path,
    /// More environment for `kiln run` (e.g. `KILN_CACHE`).
    pub env: &'a [(&'a str, &'a OsStr)],
}

/// The workspace root: kiln resolves a manifest's relative paths from where it runs.
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A `kiln run` in the background, stopped like Ctrl-C (SIGINT) and reaped when dropped, so a
/// failing step of the caller does not leave a VM running.
pub struct Run(pub Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `kiln clone` the module, `kiln run` its first clone, and once the VM's vsock socket exists
/// (up to a minute), `kiln exec <module>-1/<vm> -- argv`. The run is stopped before this
/// returns the exec's output (its stderr is also printed). Every kiln call runs from the
/// workspace root with `KILN_NO_INTERNET`, so no clone gets NAT to the host. `Err`: the clone
/// failed, or a kiln process could not be started.
pub fn clone_run_exec(c: &CloneExec, argv: &[&str]) -> Result<Output> {
    let (run, addr) = clone_and_run(c)?;
    let exec = Command::new(c.kiln)
        .arg("exec")
        .arg(&addr)
        .arg("--")
        .args(argv)
        .env("KILN_RUN_DIR", c.run_dir)
        .output()
        .map_err(|e| KitError::Command {
            cmd: "kiln exec".into(),
            detail: e.to_string(),
        })?;
    drop(run);
    eprintln!("exec stderr: {}", String::from_utf8_lossy(&exec.stderr));
    Ok(exec)
}

/// `kiln clone` the module and `kiln run` its first clone in the background, until the VM's
/// vsock socket exists (up to a minute; the guest may still be booting). Returns the run (it
/// stops when dropped) and the VM's address for `kiln exec`/`kiln shell`: `<clone>/<vm>`.
pub fn clone_and_run(c: &CloneExec) -> Result<(Run, String)> {
    let count = c.count.map(|n| n.to_string());
    let mut args: Vec<&OsStr> = vec![OsStr::new("clone"), OsStr::new(c.module)];
    if let Some(n) = &count {
        args.extend([OsStr::new("--count"), OsStr::new(n)]);
    }
    args.extend([
        OsStr::new("--modules"),
        c.modules.as_os_str(),
        OsStr::new("--clones"),
        c.clones.as_os_str(),
    ]);
    let kiln = || {
        let mut cmd = Command::new(c.kiln);
        cmd.env("KILN_NO_INTERNET", "true").current_dir(repo_root());
        cmd
    };
    let not_started = |what: &'static str| {
        move |e: std::io::Error| KitError::Command {
            cmd: what.into(),
            detail: e.to_string(),
        }
    };

    let out = kiln()
        .args(&args)
        .output()
        .map_err(not_started("kiln clone"))?;
    eprintln!(
        "$ kiln clone {}\n--- stdout\n{}--- stderr\n{}",
        c.module,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(KitError::Command {
            cmd: format!("kiln clone {}", c.module),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }

    let clone = format!("{}-1", c.module);
    let mut run = kiln();
    run.arg("run")
        .arg(&clone)
        .arg("--clones")
        .arg(c.clones)
        .env("KILN_RUN_DIR", c.run_dir);
    for (k, v) in c.env {
        run.env(k, v);
    }
    let run = Run(run.spawn().map_err(not_started("kiln run"))?);
    let sock = c
        .run_dir
        .join(format!("clones/{clone}/{}/vsock.sock", c.vm));
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < SOCKET_WAIT {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((run, format!("{clone}/{}", c.vm)))
}
