//! Commands to a VM with a screen, over its second QMP socket ([`super::control_socket`]):
//! key events (`input-send-event`), screenshots (`screendump`) and the run state
//! (`query-status`). QEMU's replies are read with a timeout on every read and a bound on
//! every line, so a broken or hostile QEMU can make a command fail but neither hang kiln nor
//! make it allocate without bound.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A reply line longer than this is refused (replies kiln asks for are a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;
/// How long one command may take: a screendump of a large screen under TCG takes well under it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a QMP command failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to QEMU's control socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to QEMU: {0}")]
    Io(#[from] io::Error),
    #[error("QEMU closed its control socket (the VM ended or rebooted)")]
    Closed,
    #[error("QEMU did not answer `{0}` within {COMMAND_TIMEOUT:?}")]
    Timeout(String),
    #[error("QEMU sent a line over {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QEMU's control socket did not greet as QMP")]
    Greeting,
    #[error("QEMU refused `{command}`: {message}")]
    Refused { command: String, message: String },
    #[error("the VM did not start running within {waited:?} (QEMU status `{status}`)")]
    NotRunning { waited: Duration, status: String },
    #[error("cancelled")]
    Cancelled,
}

/// One key event: a QEMU qcode pressed (`down`) or released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEvent {
    pub qcode: &'static str,
    pub down: bool,
}

/// A connected, negotiated QMP session on one QEMU's control socket. A reboot starts a fresh
/// QEMU, which listens on the same path again: connect anew after one.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects (retrying while QEMU starts, up to `wait`) and negotiates capabilities.
    pub fn connect(socket: &Path, wait: Duration) -> Result<Control, ControlError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(source) => {
                    return Err(ControlError::Connect {
                        path: socket.to_path_buf(),
                        source,
                    })
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut c = Control {
            reader: BufReader::new(stream),
            writer,
        };
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let greeting = c.read_line(deadline, "the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(ControlError::Greeting);
        }
        c.execute("qmp_capabilities", None)?;
        Ok(c)
    }

    /// Sends `events` in one `input-send-event`, in order: QEMU queues them on the keyboard.
    pub fn send_keys(&mut self, events: &[KeyEvent]) -> Result<(), ControlError> {
        let events: Vec<Value> = events
            .iter()
            .map(|e| {
                json!({"type": "key", "data": {"down": e.down, "key": {"type": "qcode", "data": e.qcode}}})
            })
            .collect();
        self.execute("input-send-event", Some(json!({ "events": events })))
            .map(drop)
    }

    /// Writes the screen to `path` as PNG (QEMU writes the file itself).
    pub fn screendump(&mut self, path: &Path) -> Result<(), ControlError> {
        let filename = path.to_str().ok_or_else(|| ControlError::Refused {
            command: "screendump".into(),
            message: format!("{} is not UTF-8", path.display()),
        })?;
        self.execute(
            "screendump",
            Some(json!({"filename": filename, "format": "png"})),
        )
        .map(drop)
    }

    /// QEMU's run state (`running`, `prelaunch`, `paused`...).
    pub fn status(&mut self) -> Result<String, ControlError> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .chars()
            .take(64)
            .collect())
    }

    /// Waits until the VM runs: key events fail while it is paused or not started yet.
    pub fn wait_running(
        &mut self,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), ControlError> {
        let start = Instant::now();
        loop {
            let status = self.status()?;
            if status == "running" {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(ControlError::NotRunning {
                    waited: timeout,
                    status,
                });
            }
            if cancelled() {
                return Err(ControlError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one command and returns its `return`, skipping the events QEMU sends meanwhile.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, ControlError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).map_err(io::Error::from)?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(closed)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let v = self.read_line(deadline, command)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let message = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(ControlError::Refused {
                    command: command.into(),
                    message: message.chars().take(500).collect(),
                });
            }
            // An event (or anything else): not the reply.
        }
    }

    /// Reads one JSON line before `deadline`; lines that are not JSON objects are skipped.
    fn read_line(&mut self, deadline: Instant, what: &str) -> Result<Value, ControlError> {
        let mut line = Vec::new();
        loop {
            if Instant::now() >= deadline {
                return Err(ControlError::Timeout(what.into()));
            }
            let room = MAX_LINE - line.len() as u64;
            match (&mut self.reader).take(room).read_until(b'\n', &mut line) {
                Ok(0) if room == 0 => return Err(ControlError::LineTooLong),
                Ok(0) => return Err(ControlError::Closed),
                Ok(_) if line.ends_with(b"\n") => match serde_json::from_slice::<Value>(&line) {
                    Ok(v) if v.is_object() => return Ok(v),
                    _ => line.clear(),
                },
                Ok(_) if line.len() as u64 >= MAX_LINE => return Err(ControlError::LineTooLong),
                // Part of a line: the rest follows.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(closed(e)),
            }
        }
    }
}

/// A broken pipe or reset means QEMU went away, which says more than the errno.
fn closed(e: io::Error) -> ControlError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => ControlError::Closed,
        _ => ControlError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, then answers each command line with `reply(command)`.
    fn fake_qemu(
        sock: &Path,
        reply: impl Fn(&Value) -> Vec<u8> + Send + 'static,
    ) -> std::thread::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut seen = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return seen;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                let out = reply(&v);
                seen.push(v);
                if s.write_all(&out).is_err() {
                    return seen;
                }
            }
        })
    }

    #[test]
    fn keys_screendump_and_status_are_sent_as_qmp_commands() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let server = fake_qemu(&sock, |v| {
            match v["execute"].as_str().unwrap() {
            // An event before the reply is skipped.
            "query-status" => b"{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n".to_vec(),
            "screendump" => b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no surface\"}}\n".to_vec(),
            _ => b"{\"return\": {}}\n".to_vec(),
        }
        });
        let mut c = Control::connect(&sock, Duration::from_secs(5)).unwrap();
        c.send_keys(&[
            KeyEvent {
                qcode: "shift",
                down: true,
            },
            KeyEvent {
                qcode: "a",
                down: true,
            },
        ])
        .unwrap();
        c.wait_running(Duration::from_secs(1), &|| false).unwrap();
        let e = c.screendump(&dir.path().join("s.png")).unwrap_err();
        assert_eq!(e.to_string(), "QEMU refused `screendump`: no surface");
        drop(c);
        let seen = server.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[1]["execute"], "input-send-event");
        let ev = &seen[1]["arguments"]["events"];
        assert_eq!(ev[0]["data"]["key"]["data"], "shift");
        assert_eq!(ev[0]["data"]["down"], true);
        assert_eq!(ev[1]["data"]["key"]["data"], "a");
        assert_eq!(seen[3]["arguments"]["format"], "png");
    }

    #[test]
    fn a_paused_vm_is_waited_for_until_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let _server = fake_qemu(&sock, |_| {
            b"{\"return\": {\"status\": \"prelaunch\", \"running\": false}}\n".to_vec()
        });
        let mut c = Control::connect(&sock, Duration::from_secs(5)).unwrap();
        let e = c
            .wait_running(Duration::from_millis(300), &|| false)
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::NotRunning { status, .. } if status == "prelaunch"),
            "{e}"
        );
        assert!(matches!(
            c.wait_running(Duration::from_secs(5), &|| true),
            Err(ControlError::Cancelled)
        ));
    }

    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let _server = fake_qemu(&sock, |_| vec![b'x'; 2 * MAX_LINE as usize]);
        let e = match Control::connect(&sock, Duration::from_secs(5)) {
            Err(e) => e,
            Ok(_) => panic!("a 128 KiB reply was accepted"),
        };
        assert!(matches!(e, ControlError::LineTooLong), "{e}");
    }

    #[test]
    fn a_closed_socket_and_a_missing_one_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut cmd = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut cmd)
                .unwrap();
            s.write_all(b"{\"return\": {}}\n").unwrap();
            // Then QEMU exits.
        });
        let mut c = Control::connect(&sock, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert!(matches!(c.status(), Err(ControlError::Closed)));
        let e = match Control::connect(&dir.path().join("absent"), Duration::from_millis(100)) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }
}
