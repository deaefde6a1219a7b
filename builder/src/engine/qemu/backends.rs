//! The qemu engine's device backends for one VM (block, vsock, net) over vhost-user, started
//! in this process before QEMU starts the guest, and stopped with it. They are the kiln-vmm
//! devices the kvm engine runs in its VM process: the block device is kiln-disk's qcow2 (with its backing chain) served by kiln-vmm's virtio-blk
//! logic, vsock is kiln-vmm's device with its host side on a Unix socket, and each NIC is
//! kiln-vmm's virtio-net over the VM's port on the module network (kiln-net); an `e1000` or
//! `e1000e` NIC is QEMU's device on a `-netdev stream` socket relayed to that same port
//! ([`super::stream_nic`]). A disk on
//! `scsi` or `sata` is the same kiln-disk device served as an NBD export, which QEMU attaches
//! as virtio-scsi or AHCI: whatever the bus, kiln writes the qcow2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_disk::nbd::{NbdOptions, NbdServer};

use kiln_vmm::devices::block::BlockOptions;
use kiln_vmm::vhost_user::BackendHandle;

use super::stream_nic::StreamNic;
use crate::engine::NicAttach;
use crate::engine::{vsock_uds, DiskAttach, EngineError, VmLaunch};
use crate::job::{DiskBus, NicModel};

/// How a disk reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMode {
    /// kiln's block backend over vhost-user (the product).
    VhostUser,
    /// QEMU's own virtio-blk on the qcow2 file. STEPPING STONE until kiln-vmm's vhost-user
    /// block backend lands; never chosen once it exists.
    QemuDrive,
}

/// Which block path the qemu engine uses: always kiln's own backend over vhost-user.
/// `KILN_QEMU_BLOCK=qemu` switches to QEMU's own virtio-blk, for comparing the two when
/// debugging a guest; builds never need it.
pub fn block_mode() -> BlockMode {
    match std::env::var("KILN_QEMU_BLOCK").as_deref() {
        Ok("qemu") => BlockMode::QemuDrive,
        _ => BlockMode::VhostUser,
    }
}

/// The backends serving one VM.
pub struct Backends {
    vsock_vhost: PathBuf,
    vsock: Option<kiln_vmm::devices::vsock::VsockHandle>,
    blocks: Vec<BackendHandle>,
    /// Disks on scsi or sata.
    nbds: Vec<NbdServer>,
    nets: Vec<kiln_vmm::devices::net::vhost_user::NetHandle>,
    /// NICs of a model QEMU emulates.
    streams: Vec<StreamNic>,
    /// The writable disks, for checkpoints (see [`kiln_disk::LiveDisk`]).
    live: Vec<Arc<kiln_disk::LiveDisk>>,
}

impl Backends {
    /// The vsock device's vhost-user socket for QEMU.
    pub fn vsock_socket(&self) -> Option<&Path> {
        self.vsock.as_ref().map(|_| self.vsock_vhost.as_path())
    }

    /// The writable disks as the backends hold them, in the VM's order.
    pub fn live_disks(&self) -> Vec<Arc<kiln_disk::LiveDisk>> {
        self.live.clone()
    }

    /// The NBD exports, for whoever sees QEMU exit to stop them ([`stop_exports`]).
    pub fn take_exports(&mut self) -> Vec<NbdServer> {
        std::mem::take(&mut self.nbds)
    }

    /// Stops every backend thread and waits for them.
    pub fn stop(&mut self) {
        for n in self.nets.drain(..) {
            n.stop();
            let _ = n.join();
        }
        for mut s in self.streams.drain(..) {
            s.stop();
        }
        for b in self.blocks.drain(..) {
            b.stop();
            let _ = b.join();
        }
        stop_exports(std::mem::take(&mut self.nbds));
        if let Some(v) = self.vsock.take() {
            v.stop();
            let _ = v.join();
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the vhost-user socket of NIC `i` lives (kiln-vmm's relay; the backend proper
/// listens on `<socket>.backend`).
pub fn net_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("net{i}.sock"))
}

/// Where the `-netdev stream` socket of NIC `i` (e1000, e1000e) lives.
pub fn stream_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("net{i}.stream.sock"))
}

/// Where the vhost-user socket of disk `i` lives.
pub fn block_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("blk{i}.sock"))
}

/// Stops NBD exports: each flushes its disk and removes its socket. Called once QEMU is
/// gone, so every write it sent is in the qcow2 before a capture reads it.
pub fn stop_exports(nbds: Vec<NbdServer>) {
    for n in nbds {
        let socket = n.path().to_path_buf();
        if let Err(e) = n.shutdown() {
            tracing::warn!(socket = %socket.display(), "stopping a disk's NBD export: {e}");
        }
    }
}

/// Where the NBD socket of disk `i` (on scsi or sata) lives.
pub fn nbd_socket(workdir: &Path, i: usize) -> PathBuf {
    workdir.join(format!("nbd{i}.sock"))
}

/// A VM's disk opened through kiln-disk, read-only when the VM must not write it; a writable
/// one through a handle the step cache can checkpoint, kept in `live`.
fn open_disk(
    d: &DiskAttach,
    live: &mut Vec<Arc<kiln_disk::LiveDisk>>,
) -> Result<Arc<dyn kiln_disk::BlockDevice>, EngineError> {
    let err = |e| EngineError::Backend(format!("opening {}: {e}", d.path.display()));
    if d.read_only {
        return kiln_disk::open(&d.path, kiln_disk::OpenOptions::read_only()).map_err(err);
    }
    let disk =
        kiln_disk::LiveDisk::open(&d.path, kiln_disk::OpenOptions::read_write()).map_err(err)?;
    live.push(disk.clone());
    Ok(disk)
}

/// Starts the backends a VM needs. The sockets are bound when this returns.
pub fn start(vm: &VmLaunch, block: BlockMode) -> Result<Backends, EngineError> {
    let mut b = Backends {
        vsock_vhost: vm.workdir.join("vsock.vhost"),
        vsock: None,
        blocks: Vec::new(),
        nbds: Vec::new(),
        nets: Vec::new(),
        streams: Vec::new(),
        live: Vec::new(),
    };
    for (i, d) in vm.disks.iter().enumerate() {
        if d.bus != DiskBus::Virtio {
            // Whatever `block` says: QEMU never opens a disk on these buses itself.
            let sock = nbd_socket(&vm.workdir, i);
            let _ = std::fs::remove_file(&sock);
            let server = NbdServer::bind(&sock, open_disk(d, &mut b.live)?, NbdOptions::default())
                .map_err(|e| EngineError::Backend(format!("NBD export for {}: {e}", d.name)))?;
            b.nbds.push(server);
        } else if block == BlockMode::VhostUser {
            let dev = open_disk(d, &mut b.live)?;
            let sock = block_socket(&vm.workdir, i);
            let _ = std::fs::remove_file(&sock);
            let handle = kiln_vmm::devices::block::vhost_user::spawn(
                &sock,
                dev,
                BlockOptions {
                    read_only: d.read_only,
                    serial: d.name.chars().take(20).collect(),
                    num_queues: 1,
                },
            )
            .map_err(|e| EngineError::Backend(format!("block backend for {}: {e}", d.name)))?;
            b.blocks.push(handle);
        }
    }
    let uds = vsock_uds(&vm.workdir);
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&b.vsock_vhost);
    let v = kiln_vmm::devices::vsock::spawn(&b.vsock_vhost, &uds, u64::from(vm.cid))
        .map_err(|e| EngineError::Backend(format!("vsock backend: {e}")))?;
    b.vsock = Some(v);
    for (i, nic) in vm.nics.iter().enumerate() {
        start_nic(&mut b, &vm.workdir, i, nic)?;
    }
    Ok(b)
}

/// Serves NIC `i`: kiln-vmm's virtio-net over vhost-user, or the relay of QEMU's emulated
/// model; either way on the NIC's own switch port.
fn start_nic(
    b: &mut Backends,
    workdir: &Path,
    i: usize,
    nic: &NicAttach,
) -> Result<(), EngineError> {
    match nic.model {
        NicModel::Virtio => {
            let sock = net_socket(workdir, i);
            let h = kiln_vmm::devices::net::vhost_user::spawn(&sock, nic.port.clone(), nic.mac)
                .map_err(|e| {
                    EngineError::Backend(format!("net backend for NIC {}: {e}", nic.name))
                })?;
            b.nets.push(h);
        }
        NicModel::E1000 | NicModel::E1000e => {
            b.streams
                .push(StreamNic::start(&stream_socket(workdir, i), nic)?);
        }
    }
    Ok(())
}
