//! The block-device contract.

use std::io::{self, IoSlice, IoSliceMut};

/// Errors a block device reports. Each names what failed so a caller can turn it into a
/// virtio status or a user-facing message without guessing.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("write to a read-only device")]
    ReadOnly,
    #[error(
        "request at offset {offset} length {len} is past the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("operation not supported by this device: {0}")]
    Unsupported(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

pub type BlockResult<T> = Result<T, BlockError>;

/// A disk as a flat array of bytes.
///
/// Methods take `&self` so several requests can be in flight at once from different
/// threads (virtio-blk queues, a parallel converter); implementations do their own locking.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fill `buf` from `offset`. Unallocated ranges read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;
    /// Write `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()>;
    /// Make every completed write durable.
    fn flush(&self) -> BlockResult<()>;
    /// Drop the data in a range; later reads may return zeroes or the old data.
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()>;
    /// Make a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()>;

    /// Fill `bufs` in order from `offset`, as one read: a virtio request's data is scattered
    /// over guest pages, and a device that can read into all of them at once saves a copy.
    /// The default reads through one buffer and scatters it.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        if let [one] = bufs {
            return self.read_at(one, offset);
        }
        let mut tmp = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
        self.read_at(&mut tmp, offset)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&tmp[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Write `bufs`, concatenated, at `offset`, as one write. The default gathers them into
    /// one buffer.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> BlockResult<()> {
        if let [one] = bufs {
            return self.write_at(one, offset);
        }
        let mut tmp = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in bufs {
            tmp.extend_from_slice(b);
        }
        self.write_at(&tmp, offset)
    }

    /// What the range starting at `offset` holds, and for how many bytes (at least 1, at most
    /// `len`) that answer holds. Lets a converter skip holes without reading them; the default
    /// says "data" for the whole range, which is always correct, only slower.
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(BlockStatus, u64)> {
        check_range(self.size(), offset, len)?;
        Ok((BlockStatus::Data, len))
    }
}

/// The answer of [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Known to read as zeroes (a hole, an unallocated cluster with no backing data).
    Zero,
    /// May hold data.
    Data,
}

/// Refuse requests that do not fit the device.
pub fn check_range(size: u64, offset: u64, len: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
