//! The control protocol: JSON objects, one per line, over a Unix stream socket.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::exit::ExitReason;
use crate::machine::{MachineError, VmConfig};

/// Longest line either side accepts; longer input is a protocol error, not a buffer.
pub const MAX_LINE: usize = 64 * 1024;

/// The VM a child process runs (what `kiln vm run` takes, in serializable form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    pub mem_size: u64,
    pub vcpus: u8,
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    #[serde(default)]
    pub console_terminal: bool,
}

impl VmSpec {
    /// The VM config this spec describes, with its disks opened as virtio-blk devices.
    pub fn to_config(&self) -> Result<VmConfig, MachineError> {
        let mut b = VmConfig::builder()
            .memory(self.mem_size)
            .vcpus(self.vcpus)
            .kernel(&self.kernel)
            .console_terminal(self.console_terminal);
        if let Some(i) = &self.initrd {
            b = b.initrd(i);
        }
        if let Some(c) = &self.cmdline {
            b = b.cmdline(c);
        }
        if let Some(l) = &self.console_log {
            b = b.console_log(l);
        }
        for d in &self.disks {
            b = b.device(Box::new(crate::transport::block::VirtioBlock::open(d)?));
        }
        b.build()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Build the VM and start its vCPUs.
    Start,
    Status,
    Pause,
    Resume,
    /// Stop the VM; the child then exits.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Waiting for `start`.
    Created,
    Running,
    Paused,
    Exited,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Status {
        state: VmState,
        #[serde(default)]
        exit: Option<ExitReason>,
        /// Milliseconds from the child's start to the VM's first vCPU exit.
        #[serde(default)]
        first_exit_ms: Option<f64>,
        /// CLOCK_MONOTONIC time (ns) of the first vCPU exit, comparable with the parent's
        /// clock (for the start-up benchmark).
        #[serde(default)]
        first_exit_monotonic_ns: Option<u64>,
        /// The child's start-up marks (CLOCK_MONOTONIC), from its `main` to the first
        /// vCPU exit, for the start-up breakdown.
        #[serde(default)]
        phases: Vec<crate::phases::Phase>,
    },
    Error {
        message: String,
    },
    /// Sent unasked to the controller when the VM ends; the last line on the socket.
    Exited {
        exit: ExitReason,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("control socket: the peer closed the connection")]
    Closed,
    #[error("control socket: malformed message {line:?}: {source}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Read one line (bounded) and parse it.
pub fn read_message<T: for<'de> Deserialize<'de>, R: BufRead>(
    r: &mut R,
) -> Result<T, ProtocolError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(ProtocolError::Closed);
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > MAX_LINE {
            return Err(ProtocolError::LineTooLong);
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            break;
        }
    }
    serde_json::from_slice(&line).map_err(|source| ProtocolError::Malformed {
        line: String::from_utf8_lossy(&line[..line.len().min(200)]).to_string(),
        source,
    })
}

pub fn write_message<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let mut s = serde_json::to_vec(msg).map_err(|source| ProtocolError::Malformed {
        line: String::new(),
        source,
    })?;
    s.push(b'\n');
    w.write_all(&s)?;
    w.flush()?;
    Ok(())
}

pub use crate::phases::monotonic_ns;

/// Exit status of the child process for each way a VM ends (the parent's fallback when
/// the exit event was lost).
pub fn exit_code(r: &ExitReason) -> i32 {
    match r {
        ExitReason::Poweroff => 0,
        ExitReason::Reset => 10,
        ExitReason::TripleFault { .. } => 11,
        ExitReason::InternalError { .. } => 12,
        ExitReason::Stopped => 13,
        ExitReason::VmmError { .. } => 14,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn round_trip_and_wire_format() {
        let mut buf = Vec::new();
        write_message(&mut buf, &Request::Start).unwrap();
        write_message(
            &mut buf,
            &Response::Exited {
                exit: ExitReason::Reset,
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(buf.clone()).unwrap(),
            "{\"cmd\":\"start\"}\n{\"type\":\"exited\",\"exit\":{\"reason\":\"reset\"}}\n"
        );
        let mut c = Cursor::new(buf);
        assert_eq!(read_message::<Request, _>(&mut c).unwrap(), Request::Start);
        assert_eq!(
            read_message::<Response, _>(&mut c).unwrap(),
            Response::Exited {
                exit: ExitReason::Reset
            }
        );
        assert!(matches!(
            read_message::<Request, _>(&mut c),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut c = Cursor::new(b"{\"cmd\":\"explode\"}\n".to_vec());
        assert!(matches!(
            read_message::<Request, _>(&mut c),
            Err(ProtocolError::Malformed { .. })
        ));
        let mut c = Cursor::new(vec![b'x'; MAX_LINE + 10]);
        assert!(matches!(
            read_message::<Request, _>(&mut c),
            Err(ProtocolError::LineTooLong)
        ));
    }

    #[test]
    fn spec_defaults() {
        let s: VmSpec =
            serde_json::from_str(r#"{"kernel":"/k","mem_size":268435456,"vcpus":1}"#).unwrap();
        assert_eq!(s.disks.len(), 0);
        assert!(!s.console_terminal);
    }
}
