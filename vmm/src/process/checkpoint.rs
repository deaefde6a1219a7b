//! Live checkpoints of a VMM child's writable disks, for the step cache: the child serves
//! each writable disk through a [`LiveDisk`], and a checkpoint socket (its path in the spec,
//! [`CheckpointSpec`]) takes [`CheckpointRequest`]s, one JSON object a line like the control
//! socket. Two phases, so a caller can detach every disk of the VM before attaching any (the
//! layer is a consistent set while the guest is frozen):
//!
//! - `detach {disk, layer}`: flush and close the disk's overlay and move it to `layer`;
//!   guest I/O to that disk waits. The child holds the [`kiln_disk::Detached`] guard for the
//!   connection that asked.
//! - `attach {disk, backing}`: open a fresh overlay at the disk's path over `backing` (the
//!   layer, wherever the caller moved it); guest I/O goes on.
//! - `abandon`, the connection closing, or the VM ending: every overlay that connection
//!   detached and did not attach goes back where it was.
//!
//! Layers live only under the spec's `layer_root` (a detach or attach naming any other
//! place is refused), each disk is detached by one connection at a time, and every refusal
//! is a typed [`CheckpointError`] in the answer.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::{mpsc, Arc};

use kiln_disk::{Detached, LiveDisk};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::protocol::{read_message, write_message, ProtocolError, Response};

/// Where a VM's checkpoints are asked for and where their layers may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    /// The Unix socket the child listens on for [`CheckpointRequest`]s once the VM runs.
    pub socket: PathBuf,
    /// The folder every layer path must lie under (a cache's root, say).
    pub layer_root: PathBuf,
}

/// One request on the checkpoint socket; the answer is [`Response::Ok`] or
/// [`Response::CheckpointFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum CheckpointRequest {
    /// Close disk `disk`'s overlay (its index in the spec's `disks`) and move it to `layer`.
    Detach { disk: usize, layer: PathBuf },
    /// Open a fresh overlay on disk `disk` over `backing`.
    Attach { disk: usize, backing: PathBuf },
    /// Put back every overlay this connection detached and did not attach.
    Abandon,
}

/// Why a checkpoint request was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckpointError {
    #[error("no disk {disk}: the VM has {count}")]
    UnknownDisk { disk: usize, count: usize },
    #[error("disk {disk} is read-only: it has no overlay to checkpoint")]
    ReadOnly { disk: usize },
    #[error("{} is not under the layer folder {}", path.display(), root.display())]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("disk {disk} is already detached")]
    AlreadyDetached { disk: usize },
    #[error("disk {disk} is not detached by this connection")]
    NotDetached { disk: usize },
    #[error("disk {disk}: {message}")]
    Disk { disk: usize, message: String },
}

/// A VM's disks by their index in the spec: a [`LiveDisk`] for each writable one, None for
/// a read-only one.
pub type LiveSlots = Vec<Option<Arc<LiveDisk>>>;

/// The child's writable disks as [`LiveDisk`]s, by their index in the spec (None for a
/// read-only disk), and where layers may go.
pub struct LiveDisks {
    pub disks: LiveSlots,
    root: PathBuf,
}

impl LiveDisks {
    /// `root` is resolved now (symlinks and all), so every later check compares real paths.
    pub fn new(disks: LiveSlots, root: &Path) -> std::io::Result<LiveDisks> {
        Ok(LiveDisks {
            disks,
            root: std::fs::canonicalize(root)?,
        })
    }

    fn disk(&self, disk: usize) -> Result<&LiveDisk, CheckpointError> {
        match self.disks.get(disk) {
            None => Err(CheckpointError::UnknownDisk {
                disk,
                count: self.disks.len(),
            }),
            Some(None) => Err(CheckpointError::ReadOnly { disk }),
            Some(Some(d)) => Ok(d),
        }
    }

    /// `path` resolved, if it lies under the root: the file itself when `exists`, else its
    /// folder (a layer to be made).
    fn under_root(&self, path: &Path, exists: bool) -> Result<PathBuf, CheckpointError> {
        let outside = || CheckpointError::OutsideRoot {
            path: path.to_path_buf(),
            root: self.root.clone(),
        };
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(outside());
        }
        let real = if exists {
            std::fs::canonicalize(path).map_err(|_| outside())?
        } else {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(outside());
            };
            std::fs::canonicalize(dir)
                .map_err(|_| outside())?
                .join(name)
        };
        if real.starts_with(&self.root) && real != self.root {
            Ok(real)
        } else {
            Err(outside())
        }
    }
}

/// Which connection asked (each has its own detached disks).
pub type Session = u64;

/// The detached disks, each with the connection that detached it. Lives on the thread that
/// serves the VM (the guards hold the disks' write locks). Dropping it puts every overlay
/// back.
pub struct Checkpoints<'a> {
    live: &'a LiveDisks,
    held: HashMap<usize, (Session, Detached<'a>)>,
}

impl<'a> Checkpoints<'a> {
    pub fn new(live: &'a LiveDisks) -> Self {
        Checkpoints {
            live,
            held: HashMap::new(),
        }
    }

    /// Serves one request of connection `session`.
    pub fn handle(
        &mut self,
        session: Session,
        req: CheckpointRequest,
    ) -> Result<(), CheckpointError> {
        match req {
            CheckpointRequest::Detach { disk, layer } => {
                let d = self.live.disk(disk)?;
                if self.held.contains_key(&disk) {
                    return Err(CheckpointError::AlreadyDetached { disk });
                }
                let layer = self.live.under_root(&layer, false)?;
                let guard = d.detach(&layer).map_err(|e| CheckpointError::Disk {
                    disk,
                    message: e.to_string(),
                })?;
                debug!(disk, layer = %layer.display(), "disk detached");
                self.held.insert(disk, (session, guard));
                Ok(())
            }
            CheckpointRequest::Attach { disk, backing } => {
                self.live.disk(disk)?;
                if !matches!(self.held.get(&disk), Some((s, _)) if *s == session) {
                    return Err(CheckpointError::NotDetached { disk });
                }
                let backing = self.live.under_root(&backing, true)?;
                let (_, guard) = self
                    .held
                    .remove(&disk)
                    .ok_or(CheckpointError::NotDetached { disk })?;
                guard.attach(&backing).map_err(|e| CheckpointError::Disk {
                    disk,
                    message: e.to_string(),
                })?;
                debug!(disk, backing = %backing.display(), "disk attached");
                Ok(())
            }
            CheckpointRequest::Abandon => {
                self.close(session);
                Ok(())
            }
        }
    }

    /// Puts back every overlay `session` detached and did not attach.
    pub fn close(&mut self, session: Session) {
        self.held.retain(|disk, (s, _)| {
            let keep = *s != session;
            if !keep {
                debug!(disk, "detached disk put back");
            }
            keep
        });
    }

    /// Puts back every detached overlay (before the VM stops: its I/O may wait on them).
    pub fn release_all(&mut self) {
        self.held.clear();
    }

    /// How many disks are detached now.
    pub fn detached(&self) -> usize {
        self.held.len()
    }
}

/// What a checkpoint connection's thread sends the VM's thread.
pub enum CheckpointMessage {
    Request {
        session: Session,
        req: CheckpointRequest,
        reply: mpsc::Sender<Response>,
    },
    Closed(Session),
}

/// Listens on `socket` and serves each connection on its own thread, passing its requests
/// as `wrap(message)` to the VM's thread (which answers on the reply channel).
pub fn listen<T: Send + 'static>(
    socket: &Path,
    tx: mpsc::Sender<T>,
    wrap: fn(CheckpointMessage) -> T,
) -> std::io::Result<()> {
    // A stale socket from a VMM that ran before (a reset) would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::thread::Builder::new()
        .name("kiln-checkpoint".into())
        .spawn(move || {
            for (session, conn) in (1..).zip(listener.incoming()) {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("kiln-checkpoint-conn".into())
                    .spawn(move || serve_connection(session, conn, &tx, wrap));
                if let Err(e) = spawned {
                    warn!("checkpoint connection: {e}");
                }
            }
        })?;
    Ok(())
}

fn serve_connection<T>(
    session: Session,
    conn: UnixStream,
    tx: &mpsc::Sender<T>,
    wrap: fn(CheckpointMessage) -> T,
) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let resp = match read_message::<CheckpointRequest, _>(&mut reader) {
            Ok(req) => {
                let (reply, answer) = mpsc::channel();
                if tx
                    .send(wrap(CheckpointMessage::Request {
                        session,
                        req,
                        reply,
                    }))
                    .is_err()
                {
                    break;
                }
                match answer.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Err(ProtocolError::Malformed { line, source }) => Response::Error {
                message: format!("malformed checkpoint request {line:?}: {source}"),
            },
            Err(_) => break,
        };
        if write_message(&mut writer, &resp).is_err() {
            break;
        }
    }
    let _ = tx.send(wrap(CheckpointMessage::Closed(session)));
}

/// The caller's side of one checkpoint connection. Overlays it detached and did not attach
/// go back when it is dropped (the child sees the connection close).
pub struct CheckpointClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

/// Why a checkpoint request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("checkpoint socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the VMM refused the checkpoint: {0}")]
    Refused(#[from] CheckpointError),
    #[error("the VMM answered {0:?}")]
    Unexpected(Box<Response>),
}

impl CheckpointClient {
    pub fn connect(socket: &Path) -> Result<CheckpointClient, ClientError> {
        let conn = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let writer = conn.try_clone().map_err(ProtocolError::from)?;
        Ok(CheckpointClient {
            writer,
            reader: BufReader::new(conn),
        })
    }

    pub fn request(&mut self, req: &CheckpointRequest) -> Result<(), ClientError> {
        write_message(&mut self.writer, req)?;
        match read_message::<Response, _>(&mut self.reader)? {
            Response::Ok => Ok(()),
            Response::CheckpointFailed { error } => Err(error.into()),
            r => Err(ClientError::Unexpected(Box::new(r))),
        }
    }

    pub fn detach(&mut self, disk: usize, layer: &Path) -> Result<(), ClientError> {
        self.request(&CheckpointRequest::Detach {
            disk,
            layer: layer.to_path_buf(),
        })
    }

    pub fn attach(&mut self, disk: usize, backing: &Path) -> Result<(), ClientError> {
        self.request(&CheckpointRequest::Attach {
            disk,
            backing: backing.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_disk::BlockDevice;

    fn rig() -> (tempfile::TempDir, LiveDisks) {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("vm.qcow2");
        kiln_disk::create(
            &top,
            &kiln_disk::CreateOptions {
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("cache")).unwrap();
        let disk = LiveDisk::open(&top, kiln_disk::OpenOptions::read_write()).unwrap();
        let live = LiveDisks::new(vec![Some(disk), None], &dir.path().join("cache")).unwrap();
        (dir, live)
    }

    #[test]
    fn bad_requests_are_refused_with_their_reason() {
        let (dir, live) = rig();
        let mut c = Checkpoints::new(&live);
        let layer = dir.path().join("cache/l.qcow2");
        let detach = |disk, layer: &Path| CheckpointRequest::Detach {
            disk,
            layer: layer.to_path_buf(),
        };
        let attach = |backing: &Path| CheckpointRequest::Attach {
            disk: 0,
            backing: backing.to_path_buf(),
        };
        assert_eq!(
            c.handle(1, detach(5, &layer)),
            Err(CheckpointError::UnknownDisk { disk: 5, count: 2 })
        );
        assert_eq!(
            c.handle(1, detach(1, &layer)),
            Err(CheckpointError::ReadOnly { disk: 1 })
        );
        for bad in [
            dir.path().join("l.qcow2"),
            dir.path().join("cache/../l.qcow2"),
            PathBuf::from("cache/l.qcow2"),
            dir.path().join("cache"),
            dir.path().join("nowhere/l.qcow2"),
        ] {
            assert!(
                matches!(
                    c.handle(1, detach(0, &bad)),
                    Err(CheckpointError::OutsideRoot { .. })
                ),
                "{}",
                bad.display()
            );
        }
        // A symlink inside the root that leads out of it is outside.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("cache/out")).unwrap();
        assert!(matches!(
            c.handle(1, detach(0, &dir.path().join("cache/out/l.qcow2"))),
            Err(CheckpointError::OutsideRoot { .. })
        ));
        assert_eq!(
            c.handle(1, attach(&layer)),
            Err(CheckpointError::NotDetached { disk: 0 })
        );
        c.handle(1, detach(0, &layer)).unwrap();
        assert_eq!(
            c.handle(2, detach(0, &dir.path().join("cache/m.qcow2"))),
            Err(CheckpointError::AlreadyDetached { disk: 0 })
        );
        // Another connection cannot attach what this one detached.
        assert_eq!(
            c.handle(2, attach(&layer)),
            Err(CheckpointError::NotDetached { disk: 0 })
        );
        // Nor does its closing put this one's overlay back.
        c.close(2);
        assert_eq!(c.detached(), 1);
        c.handle(1, CheckpointRequest::Abandon).unwrap();
        assert_eq!(c.detached(), 0);
        assert!(dir.path().join("vm.qcow2").exists() && !layer.exists());
    }

    #[test]
    fn detach_then_attach_leaves_the_layer_below_a_fresh_overlay() {
        let (dir, live) = rig();
        let disk = live.disks[0].clone().unwrap();
        disk.write_at(&[7u8; 4096], 0).unwrap();
        let mut c = Checkpoints::new(&live);
        let layer = dir.path().join("cache/l.qcow2");
        c.handle(
            1,
            CheckpointRequest::Detach {
                disk: 0,
                layer: layer.clone(),
            },
        )
        .unwrap();
        c.handle(
            1,
            CheckpointRequest::Attach {
                disk: 0,
                backing: layer.clone(),
            },
        )
        .unwrap();
        disk.write_at(&[8u8; 4096], 4096).unwrap();
        assert_eq!(
            kiln_disk::backing_name(&dir.path().join("vm.qcow2"))
                .unwrap()
                .as_deref(),
            Some(std::fs::canonicalize(&layer).unwrap().to_str().unwrap())
        );
        let mut b = vec![0u8; 8192];
        disk.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|x| *x == 7) && b[4096..].iter().all(|x| *x == 8));
    }
}
