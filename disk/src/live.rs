//! A disk whose top image is swapped while a VM uses it: the live external snapshot under
//! kiln's step cache. [`LiveDisk::checkpoint`] flushes and closes the VM's overlay, moves it
//! to where the layer is to live, and opens a fresh overlay at the same path backed by it;
//! guest I/O waits on a lock meanwhile (the guest's file systems are frozen by then, so it is
//! little). The path stays the same, so whoever opens the VM's disk later (a capture, a
//! fresh QEMU after a reboot) sees the whole chain.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{BlockDevice, BlockError, BlockResult, BlockStatus};
use crate::error::{DiskError, Result};
use crate::open::{open, OpenOptions};

/// A writable image opened through a handle that can swap its top while in use.
pub struct LiveDisk {
    path: PathBuf,
    opts: OpenOptions,
    size: u64,
    inner: RwLock<Arc<dyn BlockDevice>>,
}

/// Stands in for the top between closing the old one and opening the new one; never reached
/// by I/O, which waits on the write lock held across the swap.
struct Closed;

impl BlockDevice for Closed {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported("the disk is being checkpointed"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported("the disk is being checkpointed"))
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported("the disk is being checkpointed"))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported("the disk is being checkpointed"))
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |e| DiskError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(e.kind(), format!("{what}: {e}")),
    }
}

impl LiveDisk {
    /// Opens `path` (and its chain) for writing through a swappable handle.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Arc<LiveDisk>> {
        let dev = open(path, opts.clone())?;
        Ok(Arc::new(LiveDisk {
            path: path.to_path_buf(),
            opts,
            size: dev.size(),
            inner: RwLock::new(dev),
        }))
    }

    /// The VM's overlay: the same path before and after every checkpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn top(&self) -> RwLockReadGuard<'_, Arc<dyn BlockDevice>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes what the VM wrote so far a read-only layer at `layer` (a new name for the
    /// current overlay, on the same file system when a rename is to be cheap; else it is
    /// copied) and goes on writing into a fresh overlay at [`path`](Self::path) backed by it.
    /// `layer` must not exist. On an error the disk goes on as it was when that is possible.
    pub fn checkpoint(&self, layer: &Path) -> Result<()> {
        let d = self.detach(layer)?;
        let at = d.layer().to_path_buf();
        d.attach(&at)
    }

    /// The first half of [`checkpoint`](Self::checkpoint), for a caller that moves the layer
    /// on (into a cache) before the fresh overlay names it: flushes and closes the overlay
    /// and moves it to `layer`. Guest I/O waits until [`Detached::attach`]; dropping the
    /// [`Detached`] instead puts the overlay back.
    pub fn detach(&self, layer: &Path) -> Result<Detached<'_>> {
        let mut top = self.inner.write().unwrap_or_else(|p| p.into_inner());
        top.flush()?;
        if layer.exists() {
            return Err(DiskError::Invalid(format!(
                "{}: a layer is already there",
                layer.display()
            )));
        }
        // The old top must be closed (its writer dropped) before it is moved and reopened
        // read-only as the new overlay's backing file.
        let old = std::mem::replace(&mut *top, Arc::new(Closed));
        drop(old);
        if let Err(e) = move_file(&self.path, layer) {
            if let Ok(dev) = open(&self.path, self.opts.clone()) {
                *top = dev;
            }
            return Err(e);
        }
        Ok(Detached {
            disk: self,
            top: Some(top),
            layer: layer.to_path_buf(),
        })
    }
}

/// A [`LiveDisk`] between closing its overlay and opening the next one.
pub struct Detached<'a> {
    disk: &'a LiveDisk,
    top: Option<RwLockWriteGuard<'a, Arc<dyn BlockDevice>>>,
    layer: PathBuf,
}

impl Detached<'_> {
    /// Where the closed overlay is now.
    pub fn layer(&self) -> &Path {
        &self.layer
    }

    /// Opens a fresh overlay at the disk's path, backed by `backing` (the layer, wherever it
    /// was moved since). On an error the disk stays closed: its VM cannot go on.
    pub fn attach(mut self, backing: &Path) -> Result<()> {
        let mut top = self.top.take().expect("attached once");
        let abs = fs::canonicalize(backing).map_err(io_err("resolving", backing))?;
        crate::create::create_overlay(&self.disk.path, &abs, Some(self.disk.size))?;
        *top = open(&self.disk.path, self.disk.opts.clone())?;
        Ok(())
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        // Not attached: put the overlay back where it was, so the VM keeps its disk.
        if let Some(mut top) = self.top.take() {
            if move_file(&self.layer, &self.disk.path).is_ok() {
                if let Ok(dev) = open(&self.disk.path, self.disk.opts.clone()) {
                    *top = dev;
                }
            }
        }
    }
}

/// Renames `from` to `to`, copying across file systems (then syncing the copy before the
/// original goes).
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to).map_err(io_err("copying", to))?;
            fs::File::open(to)
                .and_then(|f| f.sync_all())
                .map_err(io_err("syncing", to))?;
            fs::remove_file(from).map_err(io_err("removing", from))
        }
        Err(e) => Err(io_err("moving", to)(e)),
    }
}

impl BlockDevice for LiveDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.opts.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.top().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.top().write_at(buf, offset)
    }
    fn flush(&self) -> BlockResult<()> {
        self.top().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.top().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.top().write_zeroes(offset, len)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        self.top().read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> BlockResult<()> {
        self.top().write_vectored_at(bufs, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(BlockStatus, u64)> {
        self.top().block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create, CreateOptions};

    /// A fresh qcow2 of `size` bytes in a temporary folder, opened live.
    fn fresh(size: u64) -> (tempfile::TempDir, PathBuf, Arc<LiveDisk>) {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("vm.qcow2");
        let opts = CreateOptions {
            size: Some(size),
            ..Default::default()
        };
        create(&top, &opts).unwrap();
        let disk = LiveDisk::open(&top, OpenOptions::read_write()).unwrap();
        (dir, top, disk)
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn checkpoints_keep_every_write_and_leave_a_chain_of_read_only_layers() {
        let (dir, top, disk) = fresh(8 << 20);
        disk.write_at(&pattern(1, 65536), 0).unwrap();
        let l1 = dir.path().join("layer1.qcow2");
        disk.checkpoint(&l1).unwrap();
        disk.write_at(&pattern(2, 65536), 65536).unwrap();
        // Overwrites what layer 1 holds: the layer must not change.
        disk.write_at(&pattern(3, 4096), 0).unwrap();
        let l2 = dir.path().join("layer2.qcow2");
        disk.checkpoint(&l2).unwrap();
        disk.write_at(&pattern(4, 4096), 1 << 20).unwrap();

        let mut b = vec![0u8; 65536];
        disk.read_at(&mut b, 65536).unwrap();
        assert_eq!(b, pattern(2, 65536));
        disk.flush().unwrap();

        // Layer 1 alone still holds exactly the first write.
        let one = open(&l1, OpenOptions::read_only()).unwrap();
        let mut b = vec![0u8; 65536];
        one.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(1, 65536));
        one.read_at(&mut b, 65536).unwrap();
        assert_eq!(b, vec![0u8; 65536]);
        // The live path is the top of the whole chain.
        let chain = crate::open::chain(
            &top,
            None,
            crate::open::MAX_CHAIN_DEPTH,
            &crate::open::BackingPolicy::Follow,
        )
        .unwrap();
        assert_eq!(chain.len(), 3);
        drop(disk);
        let all = open(&top, OpenOptions::read_only()).unwrap();
        let mut b = vec![0u8; 4096];
        all.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(3, 4096));
        all.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, pattern(4, 4096));
        for p in [&l1, &l2, &top] {
            let r = crate::qcow2::check::check(p).unwrap();
            assert!(r.is_clean(), "{}: {r:?}", p.display());
        }
    }

    #[test]
    fn a_checkpoint_onto_an_existing_layer_is_refused_and_the_disk_goes_on() {
        let (dir, _top, disk) = fresh(1 << 20);
        disk.write_at(&pattern(7, 4096), 0).unwrap();
        let taken = dir.path().join("taken");
        fs::write(&taken, b"someone else's").unwrap();
        assert!(disk.checkpoint(&taken).is_err());
        assert_eq!(fs::read(&taken).unwrap(), b"someone else's");
        let mut b = vec![0u8; 4096];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(7, 4096));
        disk.write_at(&pattern(8, 4096), 4096).unwrap();
    }

    #[test]
    fn a_detached_disk_dropped_unattached_goes_on_as_it_was() {
        let (dir, top, disk) = fresh(1 << 20);
        disk.write_at(&pattern(5, 4096), 0).unwrap();
        let layer = dir.path().join("layer.qcow2");
        let d = disk.detach(&layer).unwrap();
        assert!(layer.exists() && !top.exists());
        drop(d);
        assert!(top.exists() && !layer.exists());
        let mut b = vec![0u8; 4096];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(5, 4096));
        // Moved on before attaching: the overlay names the layer where it went.
        let d = disk.detach(&layer).unwrap();
        let moved = dir.path().join("elsewhere.qcow2");
        fs::rename(&layer, &moved).unwrap();
        d.attach(&moved).unwrap();
        assert_eq!(
            crate::open::backing_name(&top).unwrap().as_deref(),
            Some(fs::canonicalize(&moved).unwrap().to_str().unwrap())
        );
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(5, 4096));
    }
}
