//! Raw images: the file is the disk.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::device::{check_range, BlockDevice, BlockResult, BlockStatus};
use crate::vectored::{preadv_exact, pwritev_all};
use crate::write_behind::WriteBehind;
use crate::BlockError;

/// A raw image file.
#[derive(Debug)]
pub struct RawDevice {
    file: File,
    size: u64,
    read_only: bool,
    write_behind: WriteBehind,
}

impl RawDevice {
    pub fn new(file: File, read_only: bool) -> std::io::Result<RawDevice> {
        let size = file.metadata()?.len();
        Ok(RawDevice {
            file,
            size,
            read_only,
            write_behind: WriteBehind::default(),
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(punch, offset, len).is_ok() {
            return Ok(());
        }
        // File systems without hole punching: write zeroes.
        let buf = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.file.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        self.write_behind.wrote(&self.file, buf.len() as u64);
        Ok(())
    }
    /// One `preadv` straight into the caller's buffers (a guest's pages, for virtio-blk).
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(self.size, offset, len)?;
        preadv_exact(&self.file, bufs, offset)?;
        Ok(())
    }
    /// One `pwritev` straight from the caller's buffers.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(self.size, offset, len)?;
        pwritev_all(&self.file, bufs, offset)?;
        self.write_behind.wrote(&self.file, len);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        self.zero_range(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(BlockStatus, u64)> {
        check_range(self.size, offset, len)?;
        let end = offset + len;
        // SEEK_DATA/SEEK_HOLE tell holes apart; where unsupported everything is data.
        match self.seek(offset, libc::SEEK_DATA) {
            Some(data) if data > offset => Ok((BlockStatus::Zero, (data.min(end)) - offset)),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
                Ok((BlockStatus::Data, hole.min(end).max(offset + 1) - offset))
            }
            None => {
                // ENXIO: no data after offset.
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    Ok((BlockStatus::Zero, len))
                } else {
                    Ok((BlockStatus::Data, len))
                }
            }
        }
    }
}
