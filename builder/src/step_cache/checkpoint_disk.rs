//! A VM disk a checkpoint can swap while the VM runs, wherever it is served: a
//! [`LiveDisk`] in this process (the qemu engine's backends) or a disk of the kvm engine's
//! VMM process, reached over its checkpoint socket ([`kiln_vmm::process::checkpoint`]).
//! Both swap in two steps with the same guard: [`CheckpointDisk::detach`] moves the overlay
//! to the layer path, [`DetachedDisk::attach`] opens a fresh overlay over the layer, and a
//! guard dropped unattached puts the overlay back.

use std::path::{Path, PathBuf};

use kiln_disk::{Detached, LiveDisk};
use kiln_vmm::process::checkpoint::{CheckpointClient, ClientError};

/// Why a disk could not be swapped.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Local(#[from] kiln_disk::DiskError),
    #[error(transparent)]
    Vmm(#[from] ClientError),
}

/// A VM's writable disk whose overlay can become a layer while the VM runs.
pub trait CheckpointDisk: Send + Sync {
    /// The VM's overlay: the same path before and after every checkpoint.
    fn path(&self) -> &Path;
    /// Flushes and closes the overlay and moves it to `layer` (which must not exist); the
    /// VM's I/O to the disk waits until the guard is attached or dropped.
    fn detach<'a>(&'a self, layer: &Path) -> Result<Box<dyn DetachedDisk + 'a>, SwapError>;
}

/// A detached disk: [`attach`](DetachedDisk::attach) it, or drop it to put the overlay back.
pub trait DetachedDisk {
    /// Opens a fresh overlay at the disk's path over `backing` (the layer, wherever it was
    /// moved since). On an error the disk stays closed: its VM cannot go on.
    fn attach(self: Box<Self>, backing: &Path) -> Result<(), SwapError>;
}

impl CheckpointDisk for LiveDisk {
    fn path(&self) -> &Path {
        LiveDisk::path(self)
    }
    fn detach<'a>(&'a self, layer: &Path) -> Result<Box<dyn DetachedDisk + 'a>, SwapError> {
        Ok(Box::new(LiveDisk::detach(self, layer)?))
    }
}

impl DetachedDisk for Detached<'_> {
    fn attach(self: Box<Self>, backing: &Path) -> Result<(), SwapError> {
        Ok(Detached::attach(*self, backing)?)
    }
}

/// Disk `index` of a kvm VM, served by its VMM process. Each detach is a connection of its
/// own to the checkpoint socket, whose path stays the same when the VMM is restarted (a
/// guest reset): it reaches the VMM running then. The VMM puts the overlay back when that
/// connection closes unattached.
pub struct VmmDisk {
    pub socket: PathBuf,
    pub index: usize,
    pub path: PathBuf,
}

struct VmmDetached {
    client: CheckpointClient,
    index: usize,
}

impl CheckpointDisk for VmmDisk {
    fn path(&self) -> &Path {
        &self.path
    }
    fn detach<'a>(&'a self, layer: &Path) -> Result<Box<dyn DetachedDisk + 'a>, SwapError> {
        let mut client = CheckpointClient::connect(&self.socket)?;
        // The VMM takes absolute paths only (it checks them against its layer folder).
        let layer = std::path::absolute(layer)
            .map_err(kiln_vmm::process::protocol::ProtocolError::from)
            .map_err(ClientError::from)?;
        client.detach(self.index, &layer)?;
        Ok(Box::new(VmmDetached {
            client,
            index: self.index,
        }))
    }
}

impl DetachedDisk for VmmDetached {
    fn attach(mut self: Box<Self>, backing: &Path) -> Result<(), SwapError> {
        let backing = std::path::absolute(backing)
            .map_err(kiln_vmm::process::protocol::ProtocolError::from)
            .map_err(ClientError::from)?;
        Ok(self.client.attach(self.index, &backing)?)
    }
}
