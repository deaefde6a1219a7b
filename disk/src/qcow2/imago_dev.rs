//! qcow2 (and raw backing layers) through imago: the read-write path.

use std::io::{IoSlice, IoSliceMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::RwLock;

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::FormatAccess;

use crate::device::{check_range, BlockDevice, BlockResult, BlockStatus};
use crate::write_behind::WriteBehind;
use crate::BlockError;

/// One opened image chain, top layer first; imago owns the backing layers.
pub struct ImagoDevice {
    /// Reads and writes take the lock shared; discard and write-zeroes take it exclusively
    /// because imago requires `&mut` for operations that may drop existing data mappings.
    inner: RwLock<FormatAccess<ImagoFile>>,
    size: u64,
    read_only: bool,
    path: PathBuf,
    /// The top image's file, for `fdatasync` on flush (see [`BlockDevice::flush`] below).
    /// `None` when read-only, or if it could not be opened (imago's own sync is used then).
    sync_file: Option<std::fs::File>,
    /// Starts writeback of guest writes early, through `sync_file` (see [`WriteBehind`]).
    write_behind: WriteBehind,
}

impl std::fmt::Debug for ImagoDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagoDevice")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish()
    }
}

/// Run imago code, turning a panic inside it into a corruption error: metadata is untrusted,
/// and a panic must not take the VMM down.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> std::io::Result<T>) -> BlockResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(BlockError::Io),
        Err(_) => Err(BlockError::Corrupt(format!(
            "qcow2 driver failed during {what}"
        ))),
    }
}

impl ImagoDevice {
    pub fn new(inner: FormatAccess<ImagoFile>, read_only: bool, path: PathBuf) -> Self {
        let size = inner.size();
        let sync_file = if read_only {
            None
        } else {
            std::fs::File::open(&path)
                .inspect_err(|e| {
                    tracing::debug!(path = %path.display(), "no separate handle for fdatasync: {e}")
                })
                .ok()
        };
        ImagoDevice {
            inner: RwLock::new(inner),
            size,
            read_only,
            path,
            sync_file,
            write_behind: WriteBehind::default(),
        }
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, FormatAccess<ImagoFile>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn wrote(&self, len: u64) {
        if let Some(f) = &self.sync_file {
            self.write_behind.wrote(f, len);
        }
    }

    fn writable(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)
    }
}

impl BlockDevice for ImagoDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        guarded("read", || self.shared().read(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.writable(offset, buf.len() as u64)?;
        guarded("write", || self.shared().write(buf, offset))?;
        self.wrote(buf.len() as u64);
        Ok(())
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(self.size, offset, len)?;
        let v: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        guarded("read", || self.shared().readv(IoVectorMut::from(v), offset))
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> BlockResult<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.writable(offset, len)?;
        let v: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        guarded("write", || self.shared().writev(IoVector::from(v), offset))?;
        self.wrote(len);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        if self.read_only {
            return Ok(());
        }
        // imago writes its dirty metadata (L2 tables, refcount blocks) back here; then the
        // file goes to disk with `fdatasync`, as QEMU's `cache=writeback` does, on a handle of
        // our own. imago's `sync` is a full `fsync` (a journal commit for the mtime alone on
        // ext4) and holds its file lock for writing throughout, stalling every read and write
        // of the image until the disk has answered. External data files are refused at open,
        // so the top image's file is all there is to sync.
        guarded("flush", || {
            let g = self.shared();
            g.flush()?;
            match &self.sync_file {
                Some(f) => f.sync_data(),
                None => g.sync(),
            }
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable(offset, len)?;
        guarded("discard", || self.exclusive().discard_to_zero(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable(offset, len)?;
        guarded("write-zeroes", || {
            self.exclusive().write_zeroes(offset, len)
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(BlockStatus, u64)> {
        check_range(self.size, offset, len)?;
        guarded("block status", || {
            let g = self.shared();
            let (mapping, n) = g.get_mapping(offset, len)?;
            let status = match mapping {
                imago::Mapping::Zero { .. } | imago::Mapping::Eof { .. } => BlockStatus::Zero,
                _ => BlockStatus::Data,
            };
            Ok((status, n.clamp(1, len.max(1))))
        })
    }
}

impl Drop for ImagoDevice {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.flush() {
                tracing::warn!(path = %self.path.display(), "flush on close failed: {e}");
            }
        }
    }
}
