//! The VMM child: bind the control socket, wait for the parent, run one VM as told.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::protocol::{
    exit_code, monotonic_ns, read_message, write_message, ProtocolError, Request, Response, VmSpec,
    VmState,
};
use crate::exit::ExitReason;
use crate::machine::Machine;

/// How long the child waits for its parent to connect before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the child side; returns the process exit status (see [`super::protocol::exit_code`]).
/// `born` is when the process started, for the time-to-first-instruction report.
pub fn run_child(spec: &VmSpec, socket: &Path, born: Instant) -> i32 {
    // Ctrl-C at a terminal reaches the whole process group: let the parent decide. If the
    // parent dies of it, the closed socket stops this VM with the reason "stopped".
    // SAFETY: setting SIGINT's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    match serve(spec, socket, born) {
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

fn serve(spec: &VmSpec, socket: &Path, born: Instant) -> Result<ExitReason, ProtocolError> {
    // A stale socket from a crashed run would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let stream = accept_one(&listener)?;
    drop(listener);
    let _ = std::fs::remove_file(socket);
    let mut writer = stream.try_clone()?;

    // Requests are parsed on their own thread so the main thread can watch the VM.
    let (tx, rx) = mpsc::channel::<Result<Request, String>>();
    std::thread::Builder::new()
        .name("kiln-control".into())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            loop {
                match read_message::<Request, _>(&mut reader) {
                    Ok(r) => {
                        if tx.send(Ok(r)).is_err() {
                            return;
                        }
                    }
                    Err(ProtocolError::Closed) => {
                        // The parent is gone: nobody can stop this VM any more, so stop it.
                        let _ = tx.send(Ok(Request::Stop));
                        return;
                    }
                    Err(e) => {
                        if tx.send(Err(e.to_string())).is_err() {
                            return;
                        }
                        if matches!(e, ProtocolError::Io(_) | ProtocolError::LineTooLong) {
                            let _ = tx.send(Ok(Request::Stop));
                            return;
                        }
                    }
                }
            }
        })?;

    // Before start: only status and stop make sense.
    let config = loop {
        match rx.recv() {
            Ok(Ok(Request::Start)) => match spec.to_config() {
                Ok(c) => break c,
                Err(e) => {
                    let r = ExitReason::VmmError {
                        detail: e.to_string(),
                    };
                    write_message(
                        &mut writer,
                        &Response::Error {
                            message: e.to_string(),
                        },
                    )?;
                    return Ok(r);
                }
            },
            Ok(Ok(Request::Status)) => write_message(
                &mut writer,
                &Response::Status {
                    state: VmState::Created,
                    exit: None,
                    first_exit_ms: None,
                    first_exit_monotonic_ns: None,
                },
            )?,
            Ok(Ok(Request::Stop)) | Err(_) => {
                let _ = write_message(&mut writer, &Response::Ok);
                return Ok(ExitReason::Stopped);
            }
            Ok(Ok(other)) => write_message(
                &mut writer,
                &Response::Error {
                    message: format!("{other:?} before start"),
                },
            )?,
            Ok(Err(msg)) => write_message(&mut writer, &Response::Error { message: msg })?,
        }
    };
    let mut machine = match Machine::start(config) {
        Ok(m) => m,
        Err(e) => {
            write_message(
                &mut writer,
                &Response::Error {
                    message: e.to_string(),
                },
            )?;
            return Ok(ExitReason::VmmError {
                detail: e.to_string(),
            });
        }
    };
    write_message(&mut writer, &Response::Ok)?;
    let reason = loop {
        if let Some(r) = machine.wait_timeout(Duration::from_millis(20)) {
            break r;
        }
        while let Ok(req) = rx.try_recv() {
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
                        .map(|t| t.duration_since(born).as_secs_f64() * 1e3),
                    first_exit_monotonic_ns: machine.first_exit().map(|t| {
                        let ago = Instant::now().saturating_duration_since(t).as_nanos() as u64;
                        monotonic_ns().saturating_sub(ago)
                    }),
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
        }
    };
    // Best effort: the parent may already be gone.
    let _ = write_message(
        &mut writer,
        &Response::Exited {
            exit: reason.clone(),
        },
    );
    Ok(reason)
}
