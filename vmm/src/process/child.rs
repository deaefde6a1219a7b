//! The VMM child: bind the control socket, wait for the parent, run one VM as told.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::checkpoint::{self, CheckpointMessage, Checkpoints, LiveDisks};
use super::protocol::{
    exit_code, read_message, write_message, ProtocolError, Request, Response, VmSpec, VmState,
};
use crate::exit::ExitReason;
use crate::machine::{Machine, Prepared};
use crate::phases::{instant_to_ns, Phases};

/// How long the child waits for its parent to connect before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a running VM's end is checked while no request comes.
const POLL: Duration = Duration::from_millis(20);

/// The whole `__vmm` mode for a binary's `main`: `args` are the arguments after the
/// subcommand (`--socket PATH --spec JSON`). Call it before anything else in `main` (no
/// CLI parse, no logging set-up): start-up time counts from process start. `after_start`
/// runs once the vCPUs run (set up logging there). Returns the process exit status.
/// `--nop` returns 0 at once (to measure what the process costs before any VM work).
pub fn main(args: &[std::ffi::OsString], after_start: impl FnOnce()) -> i32 {
    let born = Instant::now();
    let mut socket = None;
    let mut spec = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--nop") => return 0,
            Some("--socket") => socket = it.next().map(std::path::PathBuf::from),
            Some("--spec") => spec = it.next().cloned(),
            _ => {
                eprintln!(
                    "kiln __vmm: unexpected argument {a:?}; usage: __vmm --socket PATH --spec JSON"
                );
                return 2;
            }
        }
    }
    let (Some(socket), Some(spec)) = (socket, spec) else {
        eprintln!("kiln __vmm: usage: __vmm --socket PATH --spec JSON");
        return 2;
    };
    let spec: VmSpec = match spec
        .to_str()
        .ok_or_else(|| "not UTF-8".to_string())
        .and_then(|s| serde_json::from_str(s).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln __vmm: --spec: {e}");
            return 2;
        }
    };
    run_child_with(&spec, &socket, born, after_start)
}

/// Run the child side; returns the process exit status (see [`super::protocol::exit_code`]).
/// `born` is when the process started, for the time-to-first-instruction report.
pub fn run_child(spec: &VmSpec, socket: &Path, born: Instant) -> i32 {
    run_child_with(spec, socket, born, || {})
}

/// [`run_child`], calling `after_start` once the vCPUs run.
pub fn run_child_with(
    spec: &VmSpec,
    socket: &Path,
    born: Instant,
    after_start: impl FnOnce(),
) -> i32 {
    let phases = Phases::new();
    phases.mark_at("VMM process main()", instant_to_ns(born));
    // Ctrl-C at a terminal reaches the whole process group: let the parent decide. If the
    // parent dies of it, the closed socket stops this VM with the reason "stopped".
    // SAFETY: setting SIGINT's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    match serve(spec, socket, phases, after_start) {
        Ok(r) => {
            info!("VM ended: {r}");
            exit_code(&r)
        }
        Err(e) => {
            error!("VMM child: {e}");
            exit_code(&ExitReason::VmmError {
                detail: e.to_string(),
            })
        }
    }
}

/// What the control thread tells the main thread.
enum Control {
    /// The parent connected; replies go to this stream.
    Connected(UnixStream),
    /// A request, or why a line could not be read as one.
    Request(Result<Request, String>),
    /// Binding or accepting failed.
    Failed(ProtocolError),
    /// From a connection on the checkpoint socket.
    Checkpoint(CheckpointMessage),
}

/// The machine, and its writable disks when the spec asks for checkpoints.
fn prepare(spec: &VmSpec, phases: &Phases) -> Result<(Prepared, Option<LiveDisks>), String> {
    let (config, disks) = spec.to_config_live().map_err(|e| e.to_string())?;
    let live = match &spec.checkpoint {
        Some(c) => Some(LiveDisks::new(disks, &c.layer_root).map_err(|e| {
            format!(
                "the checkpoint layer folder {}: {e}",
                c.layer_root.display()
            )
        })?),
        None => None,
    };
    let prepared = Machine::prepare(config, phases.clone()).map_err(|e| e.to_string())?;
    Ok((prepared, live))
}

/// Bind `socket`, accept the parent, then forward its requests (a closed connection
/// becomes a stop: nobody can stop this VM any more).
fn control_thread(socket: PathBuf, tx: mpsc::Sender<Control>) {
    let accepted = (|| {
        // A stale socket from a crashed run would make bind fail.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let stream = accept_one(&listener)?;
        drop(listener);
        let _ = std::fs::remove_file(&socket);
        Ok::<_, ProtocolError>(stream)
    })();
    let stream = match accepted.and_then(|s| Ok((s.try_clone()?, s))) {
        Ok((w, s)) => {
            if tx.send(Control::Connected(w)).is_err() {
                return;
            }
            s
        }
        Err(e) => {
            let _ = tx.send(Control::Failed(e));
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        match read_message::<Request, _>(&mut reader) {
            Ok(r) => {
                if tx.send(Control::Request(Ok(r))).is_err() {
                    return;
                }
            }
            Err(ProtocolError::Closed) => {
                let _ = tx.send(Control::Request(Ok(Request::Stop)));
                return;
            }
            Err(e) => {
                if tx.send(Control::Request(Err(e.to_string()))).is_err() {
                    return;
                }
                if matches!(e, ProtocolError::Io(_) | ProtocolError::LineTooLong) {
                    let _ = tx.send(Control::Request(Ok(Request::Stop)));
                    return;
                }
            }
        }
    }
}

fn accept_one(listener: &UnixListener) -> Result<UnixStream, ProtocolError> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = CONNECT_TIMEOUT.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd for a listener we own.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    Ok(listener.accept()?.0)
}

fn serve(
    spec: &VmSpec,
    socket: &Path,
    phases: Phases,
    after_start: impl FnOnce(),
) -> Result<ExitReason, ProtocolError> {
    // The socket handshake runs on its own thread while this one builds the VM, so neither
    // waits for the other; only running the vCPUs waits for the parent's `start`.
    let (tx, rx) = mpsc::channel::<Control>();
    let socket = socket.to_path_buf();
    let control_tx = tx.clone();
    std::thread::Builder::new()
        .name("kiln-control".into())
        .spawn(move || control_thread(socket, control_tx))?;
    let (mut prepared, live) = match prepare(spec, &phases) {
        Ok((p, live)) => (Some(Ok(p)), live),
        Err(e) => (Some(Err(e)), None),
    };
    let mut writer = None;

    // Before start: only status and stop make sense.
    let mut machine = loop {
        let req = match rx.recv() {
            Ok(Control::Connected(w)) => {
                phases.mark("parent connected (control thread)");
                writer = Some(w);
                continue;
            }
            Ok(Control::Failed(e)) => return Err(e),
            Ok(Control::Request(r)) => r,
            // The checkpoint socket is only bound once the VM runs.
            Ok(Control::Checkpoint(_)) => continue,
            Err(_) => return Err(ProtocolError::Closed),
        };
        // Requests only come after `Connected`.
        let Some(w) = writer.as_mut() else {
            return Err(ProtocolError::Closed);
        };
        match req {
            Ok(Request::Start) => {
                phases.mark("start request received");
                let started = match prepared.take() {
                    Some(Ok(p)) => p.start().map_err(|e| e.to_string()),
                    Some(Err(e)) => Err(e),
                    None => Err("the VM is already started".into()),
                };
                match started {
                    Ok(m) => break m,
                    Err(message) => {
                        write_message(
                            w,
                            &Response::Error {
                                message: message.clone(),
                            },
                        )?;
                        return Ok(ExitReason::VmmError { detail: message });
                    }
                }
            }
            Ok(Request::Status) => write_message(
                w,
                &Response::Status {
                    state: VmState::Created,
                    exit: None,
                    first_exit_ms: None,
                    first_exit_monotonic_ns: None,
                    phases: phases.snapshot(),
                },
            )?,
            Ok(Request::Stop) | Err(_) => {
                let _ = write_message(w, &Response::Ok);
                return Ok(ExitReason::Stopped);
            }
            Ok(other) => write_message(
                w,
                &Response::Error {
                    message: format!("{other:?} before start"),
                },
            )?,
        }
    };
    let mut writer = writer.ok_or(ProtocolError::Closed)?;
    // Declared after `machine` and dropped before it: every overlay goes back before the
    // VM's devices go.
    let mut checkpoints = None;
    if let (Some(live), Some(c)) = (&live, &spec.checkpoint) {
        if let Err(e) = checkpoint::listen(&c.socket, tx.clone(), Control::Checkpoint) {
            machine.stop();
            let message = format!("the checkpoint socket {}: {e}", c.socket.display());
            write_message(
                &mut writer,
                &Response::Error {
                    message: message.clone(),
                },
            )?;
            return Ok(ExitReason::VmmError { detail: message });
        }
        checkpoints = Some(Checkpoints::new(live));
    }
    drop(tx);
    write_message(&mut writer, &Response::Ok)?;
    after_start();
    let born_ns = phases.snapshot().first().map(|p| p.at_ns).unwrap_or(0);
    let reason = loop {
        if let Some(r) = machine.wait_timeout(Duration::ZERO) {
            break r;
        }
        let ctl = match rx.recv_timeout(POLL) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            // Nobody can ask anything any more: wait for the VM's end.
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(r) = machine.wait_timeout(POLL) {
                    break r;
                }
                continue;
            }
        };
        let req = match ctl {
            Control::Request(req) => req,
            Control::Checkpoint(CheckpointMessage::Request {
                session,
                req,
                reply,
            }) => {
                let resp = match checkpoints.as_mut().map(|c| c.handle(session, req)) {
                    Some(Ok(())) => Response::Ok,
                    Some(Err(error)) => Response::CheckpointFailed { error },
                    None => Response::Error {
                        message: "this VM takes no checkpoints".into(),
                    },
                };
                let _ = reply.send(resp);
                continue;
            }
            Control::Checkpoint(CheckpointMessage::Closed(session)) => {
                if let Some(c) = checkpoints.as_mut() {
                    c.close(session);
                }
                continue;
            }
            Control::Connected(_) | Control::Failed(_) => continue,
        };
        let resp = match req {
            Ok(Request::Status) => Response::Status {
                state: if machine.is_paused() {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                exit: None,
                first_exit_ms: machine
                    .first_exit()
                    .map(|t| instant_to_ns(t).saturating_sub(born_ns) as f64 / 1e6),
                first_exit_monotonic_ns: machine.first_exit().map(instant_to_ns),
                phases: machine.phases(),
            },
            Ok(Request::Pause) => {
                machine.pause();
                Response::Ok
            }
            Ok(Request::Resume) => {
                machine.resume();
                Response::Ok
            }
            Ok(Request::Stop) => {
                // The VM's I/O may be waiting on a detached disk.
                if let Some(c) = checkpoints.as_mut() {
                    c.release_all();
                }
                machine.stop();
                Response::Ok
            }
            Ok(Request::Start) => Response::Error {
                message: "the VM is already started".into(),
            },
            Err(message) => Response::Error { message },
        };
        if let Err(e) = write_message(&mut writer, &resp) {
            warn!("control reply: {e}");
        }
    };
    drop(checkpoints);
    if let Some(c) = &spec.checkpoint {
        let _ = std::fs::remove_file(&c.socket);
    }
    // Best effort: the parent may already be gone.
    let _ = write_message(
        &mut writer,
        &Response::Exited {
            exit: reason.clone(),
        },
    );
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn argument_errors_exit_2_without_touching_kvm() {
        assert_eq!(main(&args(&["--nop"]), || {}), 0);
        assert_eq!(main(&args(&["--bogus"]), || {}), 2);
        assert_eq!(main(&args(&["--socket", "/tmp/x"]), || {}), 2);
        assert_eq!(
            main(&args(&["--socket", "/tmp/x", "--spec", "{not json"]), || {}),
            2
        );
    }
}
