//! The control protocol: JSON objects, one per line, over a Unix stream socket.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use kiln_disk::LiveDisk;
use serde::{Deserialize, Serialize};

pub use super::checkpoint::{CheckpointError, CheckpointSpec, LiveSlots};
use crate::exit::ExitReason;
use crate::machine::{MachineError, VmConfig};

/// Longest line either side accepts; longer input is a protocol error, not a buffer.
pub const MAX_LINE: usize = 64 * 1024;

/// The VM a child process runs (what `kiln vm run` and the `kvm` engine of `kiln build`
/// take, in serializable form). Virtio devices are placed in this order: `disks`, then
/// `nics`, then `vsock`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    pub mem_size: u64,
    pub vcpus: u8,
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    #[serde(default)]
    pub console_terminal: bool,
    /// NICs whose frames cross the process boundary on an inherited socket.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockSpec>,
    /// Live checkpoints of the writable disks (the step cache), if asked for.
    #[serde(default)]
    pub checkpoint: Option<CheckpointSpec>,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// A raw or qcow2 image (probed).
    pub path: PathBuf,
    /// Offered read-only (a NoCloud seed, say).
    #[serde(default)]
    pub read_only: bool,
    /// The GET_ID answer (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default)]
    pub serial: String,
}

impl DiskSpec {
    /// A writable disk without a serial.
    pub fn writable(path: impl Into<PathBuf>) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            ..DiskSpec::default()
        }
    }
}

/// One virtio-net NIC. Its frames travel on a `SOCK_SEQPACKET` socket (one frame per
/// message, [`kiln_net::SeqpacketPort`]) that the parent made and the child inherited as
/// descriptor `fd`; the parent relays between the other end and the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub mac: [u8; 6],
    /// The inherited descriptor number (3 or more).
    pub fd: i32,
}

/// The virtio-vsock device: the guest's CID and the host-side Unix socket (Firecracker's
/// `CONNECT <port>` convention; guest-to-host connections reach `<uds_path>_<port>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSpec {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

impl VmSpec {
    /// The VM config this spec describes, with its devices made: disks opened, the vsock
    /// socket bound, and the NICs' inherited descriptors taken over. Call it once per
    /// process: the NIC descriptors then belong to the returned config.
    pub fn to_config(&self) -> Result<VmConfig, MachineError> {
        self.to_config_live().map(|(c, _)| c)
    }

    /// [`to_config`](Self::to_config), with each writable disk served through a
    /// [`LiveDisk`] (returned by its index in `disks`; None for a read-only disk) so its
    /// overlay can be checkpointed while the VM runs.
    pub fn to_config_live(&self) -> Result<(VmConfig, LiveSlots), MachineError> {
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
        let mut live = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            if d.read_only {
                live.push(None);
                b = b.device(Box::new(crate::devices::block::VirtioBlock::open_with(
                    &d.path,
                    d.read_only,
                    &d.serial,
                )?));
                continue;
            }
            let disk = LiveDisk::open(&d.path, kiln_disk::OpenOptions::read_write())
                .map_err(|e| MachineError::Config(format!("disk {}: {e}", d.path.display())))?;
            live.push(Some(disk.clone()));
            let opts = crate::devices::block::BlockOptions {
                serial: d.serial.clone(),
                ..Default::default()
            };
            b = b.device(Box::new(crate::devices::block::VirtioBlock::new(
                disk, &opts,
            )));
        }
        // Check every descriptor before taking any over.
        for (i, n) in self.nics.iter().enumerate() {
            // Never take over stdin, stdout or stderr (a spec naming them is a bug upstream).
            if n.fd < 3 {
                return Err(MachineError::Config(format!(
                    "NIC {i}: descriptor {} is not an inherited socket",
                    n.fd
                )));
            }
            if self.nics[..i].iter().any(|o| o.fd == n.fd) {
                return Err(MachineError::Config(format!(
                    "NIC {i}: descriptor {} is already another NIC's",
                    n.fd
                )));
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            // SAFETY: the parent passed this descriptor for this NIC alone; nothing else in
            // this process owns it, and this is the only place that takes it over.
            let port = unsafe { kiln_net::SeqpacketPort::from_raw_inherited(n.fd) }
                .map_err(|e| MachineError::Config(format!("NIC {i}: {e}")))?;
            b = b.device(Box::new(crate::devices::net::VirtioNet::new(
                std::sync::Arc::new(port),
                n.mac,
            )));
        }
        if let Some(v) = &self.vsock {
            let dev = crate::devices::vsock::VirtioVsock::new(u64::from(v.guest_cid), &v.uds_path)
                .map_err(|e| MachineError::Config(format!("vsock: {e}")))?;
            b = b.device(Box::new(dev));
        }
        Ok((b.build()?, live))
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
    /// A checkpoint request (on the checkpoint socket) refused or failed.
    CheckpointFailed {
        error: CheckpointError,
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
    fn spec_devices_are_made_in_order() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed.img");
        std::fs::write(&seed, vec![0u8; 1 << 20]).unwrap();
        let (_parent, child) = kiln_net::seqpacket_pair().unwrap();
        let spec = VmSpec {
            kernel: "/k".into(),
            mem_size: 64 << 20,
            vcpus: 1,
            disks: vec![DiskSpec {
                path: seed,
                read_only: true,
                serial: "cidata".into(),
            }],
            nics: vec![NicSpec {
                mac: [2, 0, 0, 0, 0, 1],
                fd: child.into_raw_fd(),
            }],
            vsock: Some(VsockSpec {
                guest_cid: 3,
                uds_path: dir.path().join("v.sock"),
            }),
            ..VmSpec::default()
        };
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let cfg = spec.to_config().unwrap();
        let types: Vec<u32> = cfg.devices.iter().map(|d| d.device_type()).collect();
        assert_eq!(types, vec![2, 1, 19], "blk, net, vsock");
        // The seed is offered read-only (VIRTIO_BLK_F_RO, bit 5).
        assert_ne!(cfg.devices[0].features() & (1 << 5), 0);
        assert!(dir.path().join("v.sock").exists(), "vsock socket bound");
    }

    #[test]
    fn spec_nic_descriptors_are_checked() {
        let mut spec = VmSpec {
            kernel: "/k".into(),
            mem_size: 64 << 20,
            vcpus: 1,
            nics: vec![NicSpec {
                mac: [2, 0, 0, 0, 0, 1],
                fd: 1,
            }],
            ..VmSpec::default()
        };
        let e = spec.to_config().unwrap_err().to_string();
        assert!(e.contains("not an inherited socket"), "{e}");
        // Two NICs on one descriptor: refused before either is taken over.
        spec.nics = vec![spec.nics[0].clone(), spec.nics[0].clone()];
        spec.nics[0].fd = 1000;
        spec.nics[1].fd = 1000;
        let e = spec.to_config().unwrap_err().to_string();
        assert!(e.contains("already another NIC's"), "{e}");
        // An open descriptor that is not a seqpacket socket: refused, named (and closed:
        // the spec gave it to the VM).
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::IntoRawFd;
        spec.nics.truncate(1);
        spec.nics[0].fd = f.into_raw_fd();
        let e = spec.to_config().unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
    }

    #[test]
    fn spec_defaults() {
        let s: VmSpec =
            serde_json::from_str(r#"{"kernel":"/k","mem_size":268435456,"vcpus":1}"#).unwrap();
        assert_eq!(s.disks.len(), 0);
        assert!(!s.console_terminal);
        assert!(s.nics.is_empty() && s.vsock.is_none());
    }
}
