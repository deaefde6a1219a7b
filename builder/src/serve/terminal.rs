//! A terminal in a running clone's VM on the page: a WebSocket relayed to a login shell on
//! a terminal that the VM's agent opens (`kiln shell`'s session). Binary messages carry the
//! terminal's bytes both ways; the page's text messages are JSON `{"rows": R, "cols": C}`
//! (a new window size); the server's text messages are JSON `{"error": "..."}` (no shell:
//! the VM is not running, the agent refused) or `{"exit": "exit code N"}`, each followed
//! by the close. The route's checks (Host, Origin, token) are the server's, made before
//! this runs; the page closing the socket ends the shell and everything it started.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::Duration;

use kiln_agent::{ExecRequest, Tty, WindowSize};
use tungstenite::{Message, WebSocket};

use super::console;
use super::http::Request;
use crate::running_vm;

/// Largest message taken from the page: keystrokes and pastes.
const MAX_MESSAGE: usize = 64 << 10;
/// Chunks waiting in either direction; a side that falls behind makes the other wait.
const QUEUE: usize = 64;
/// How long to wait for the VM's agent (a clone that was just started is still booting).
const AGENT_WAIT: Duration = Duration::from_secs(120);
/// Largest window size taken from the page.
const MAX_CELLS: u16 = 1000;

/// The initial window size from the request's `rows` and `cols` (default 24x80).
pub fn size_of(rows: Option<String>, cols: Option<String>) -> WindowSize {
    let cells = |v: Option<String>, d: u16| {
        v.and_then(|v| v.parse::<u16>().ok())
            .filter(|n| (1..=MAX_CELLS).contains(n))
            .unwrap_or(d)
    };
    WindowSize {
        rows: cells(rows, 24),
        cols: cells(cols, 80),
    }
}

/// What the page sends the shell.
enum Input {
    Keys(Vec<u8>),
    Resize(WindowSize),
}

/// What the shell sends the page.
enum Output {
    Bytes(Vec<u8>),
    /// The last message: `{"exit"}` or `{"error"}`.
    End(serde_json::Value),
}

/// Answers the handshake of `req` (checked by [`console::upgrade_error`]) and relays between
/// the page and a login shell in VM `vm` of the running clone `clone`. Runs on a thread of
/// its own.
pub fn open(req: Request, clone: &str, vm: &str, size: WindowSize) {
    let Some(tcp) = console::accept(req, "kiln-terminal") else {
        return;
    };
    let mut ws = match console::server_socket(tcp, MAX_MESSAGE) {
        Ok(ws) => ws,
        Err(e) => return tracing::debug!("terminal socket: {e}"),
    };
    let (in_tx, in_rx) = sync_channel::<Input>(QUEUE);
    let (out_tx, out_rx) = sync_channel::<Output>(QUEUE);
    let (clone, vm) = (clone.to_string(), vm.to_string());
    let shell = std::thread::Builder::new()
        .name("serve-terminal".into())
        .spawn(move || run_shell(&clone, &vm, size, in_rx, out_tx));
    let shell = match shell {
        Ok(t) => t,
        Err(e) => {
            end(&mut ws, &serde_json::json!({ "error": e.to_string() }));
            return;
        }
    };
    if let Err(e) = relay(&mut ws, &in_tx, &out_rx) {
        tracing::debug!("terminal relay ended: {e}");
    }
    // The shell's side stops on its own once both channels are gone: the feeder hangs up,
    // which makes the agent end the shell's whole session.
    drop(in_tx);
    drop(out_rx);
    let _ = shell.join();
}

/// Connects to the VM's agent and runs the login shell until it exits or the page leaves.
fn run_shell(
    clone: &str,
    vm: &str,
    size: WindowSize,
    input: Receiver<Input>,
    output: SyncSender<Output>,
) {
    let shell = running_vm::socket(clone, vm)
        .and_then(|sock| running_vm::connect(&sock, AGENT_WAIT))
        .map_err(|e| e.to_string())
        .and_then(|mut c| {
            let req = ExecRequest::login_shell(size).tty(Tty {
                term: "xterm-256color".into(),
                size,
            });
            c.exec_tty(
                &req,
                move |mut tty| loop {
                    match input.recv_timeout(Duration::from_millis(100)) {
                        Ok(Input::Keys(k)) => {
                            if tty.write(&k).is_err() {
                                return;
                            }
                        }
                        Ok(Input::Resize(s)) => {
                            if tty.resize(s).is_err() {
                                return;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) if !tty.done() => {}
                        Err(RecvTimeoutError::Timeout) => return,
                        Err(RecvTimeoutError::Disconnected) => return tty.hang_up(),
                    }
                },
                |d| {
                    let _ = output.send(Output::Bytes(d.to_vec()));
                },
            )
            .map_err(|e| e.to_string())
        });
    let last = match shell {
        Ok(st) => serde_json::json!({ "exit": st.to_string() }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let _ = output.send(Output::End(last));
}

/// Relays until the page closes, the shell ends, or either side fails.
fn relay(
    ws: &mut WebSocket<TcpStream>,
    input: &SyncSender<Input>,
    output: &Receiver<Output>,
) -> std::io::Result<()> {
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                if input.send(Input::Keys(b.to_vec())).is_err() {
                    return Ok(());
                }
            }
            Ok(Message::Text(t)) => {
                if let Some(size) = resize_of(t.as_str()) {
                    if input.send(Input::Resize(size)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(Message::Close(_)) => return Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        loop {
            let m = match output.try_recv() {
                Ok(Output::Bytes(b)) => Message::Binary(b.into()),
                Ok(Output::End(v)) => {
                    end(ws, &v);
                    return Ok(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            };
            if let Err(e) = ws.write(m) {
                if !console::is_would_block(&e) {
                    return Ok(());
                }
            }
        }
        if let Err(e) = ws.flush() {
            if !console::is_would_block(&e) {
                return Ok(());
            }
        }
    }
}

/// A window size from the page: `{"rows": R, "cols": C}` within bounds, else nothing.
fn resize_of(text: &str) -> Option<WindowSize> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let cells = |k: &str| {
        v.get(k)?
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (1..=MAX_CELLS).contains(n))
    };
    Some(WindowSize {
        rows: cells("rows")?,
        cols: cells("cols")?,
    })
}

/// Sends the last message and closes.
fn end(ws: &mut WebSocket<TcpStream>, last: &serde_json::Value) {
    let _ = ws.send(Message::Text(last.to_string().into()));
    let _ = ws.close(None);
    let _ = ws.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_the_page_are_bounded() {
        assert_eq!(
            resize_of(r#"{"rows": 40, "cols": 120}"#),
            Some(WindowSize {
                rows: 40,
                cols: 120
            })
        );
        assert_eq!(resize_of(r#"{"rows": 0, "cols": 120}"#), None);
        assert_eq!(resize_of(r#"{"rows": 70000, "cols": 120}"#), None);
        assert_eq!(resize_of("not json"), None);
        assert_eq!(
            size_of(Some("50".into()), Some("x".into())),
            WindowSize { rows: 50, cols: 80 }
        );
    }
}
