//! The one thing kiln needs from QEMU's monitor protocol (QMP): why the guest stopped.
//!
//! QEMU runs with `-no-reboot`, so a guest reboot ends the process just like a power-off;
//! only the `SHUTDOWN` event's `reason` (`guest-reset` against `guest-shutdown`) tells them
//! apart. The qemu engine then starts a fresh QEMU for a reboot (as the kvm engine starts a
//! fresh VMM process). QEMU's output on this socket is untrusted only in the sense that it
//! may be cut short: lines are bounded and anything unparsable is ignored.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A QMP line longer than this is not an event kiln reads.
const MAX_LINE: u64 = 64 * 1024;

/// Reads one QEMU's QMP events on a thread until QEMU closes the socket.
pub struct ShutdownWatch {
    thread: Option<JoinHandle<Option<String>>>,
}

impl ShutdownWatch {
    /// Connects to QEMU's QMP socket (retrying while QEMU starts, up to `connect_for`) and
    /// watches for the `SHUTDOWN` event.
    pub fn start(socket: &Path, connect_for: Duration) -> ShutdownWatch {
        let socket = socket.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("kiln-qmp".into())
            .spawn(move || watch(&socket, connect_for))
            .ok();
        ShutdownWatch { thread }
    }

    /// The `reason` of the last `SHUTDOWN` event, once QEMU has exited (the socket is then
    /// closed, so this does not block for long). `None` when there was none.
    pub fn reason(mut self) -> Option<String> {
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

fn watch(socket: &PathBuf, connect_for: Duration) -> Option<String> {
    let deadline = Instant::now() + connect_for;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::debug!("qmp {}: {e}", socket.display());
                return None;
            }
        }
    };
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    let mut reason = None;
    let mut negotiated = false;
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return reason,
            Ok(_) => {}
        }
        if !negotiated {
            // The greeting: events flow only after capabilities are negotiated.
            negotiated = true;
            if writer
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .is_err()
            {
                return reason;
            }
            continue;
        }
        if let Some(r) = shutdown_reason(&line) {
            reason = Some(r);
        }
    }
}

/// The `reason` of a `SHUTDOWN` event line.
pub fn shutdown_reason(line: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v.get("event")?.as_str()? != "SHUTDOWN" {
        return None;
    }
    Some(v.get("data")?.get("reason")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reason_of_shutdown_events_only() {
        let reset = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#;
        assert_eq!(shutdown_reason(reset).as_deref(), Some("guest-reset"));
        let off = br#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
        assert_eq!(shutdown_reason(off).as_deref(), Some("guest-shutdown"));
        assert_eq!(shutdown_reason(br#"{"event": "RESET", "data": {}}"#), None);
        assert_eq!(shutdown_reason(br#"{"return": {}}"#), None);
        assert_eq!(shutdown_reason(b"not json"), None);
    }

    #[test]
    fn a_fake_qemu_session_yields_the_last_reason() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut cmd = String::new();
            r.read_line(&mut cmd).unwrap();
            assert!(cmd.contains("qmp_capabilities"), "{cmd}");
            s.write_all(b"{\"return\": {}}\n").unwrap();
            s.write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-reset\"}}\n")
                .unwrap();
            // Then QEMU exits: the socket closes.
        });
        let w = ShutdownWatch::start(&sock, Duration::from_secs(5));
        server.join().unwrap();
        assert_eq!(w.reason().as_deref(), Some("guest-reset"));
    }

    #[test]
    fn no_qemu_means_no_reason() {
        let dir = tempfile::tempdir().unwrap();
        let w = ShutdownWatch::start(&dir.path().join("absent.sock"), Duration::from_millis(50));
        assert_eq!(w.reason(), None);
    }
}
