//! kiln's own read-only qcow2 reader: used for images imago refuses (zstd-compressed
//! clusters) and as an independent second implementation in tests.

use std::io::IoSliceMut;
use std::sync::Arc;

use super::meta::{Cluster, Meta};
use crate::device::{check_range, BlockDevice, BlockResult, BlockStatus};
use crate::vectored::{fill_zero, preadv_exact, scatter, sub_slices_mut};
use crate::BlockError;

/// A read-only qcow2 layer over an optional backing device.
pub struct Qcow2Reader {
    meta: Meta,
    backing: Option<Arc<dyn BlockDevice>>,
}

impl Qcow2Reader {
    pub fn new(meta: Meta, backing: Option<Arc<dyn BlockDevice>>) -> Self {
        Qcow2Reader { meta, backing }
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        // The backing file may be shorter than this layer: the rest reads as zeroes.
        let bsize = b.size();
        let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            b.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// [`Self::read_backing`] into a scatter list.
    fn read_backing_v(&self, out: &mut [IoSliceMut<'_>], offset: u64, n: usize) -> BlockResult<()> {
        let avail = match &self.backing {
            Some(b) => b.size().saturating_sub(offset).min(n as u64) as usize,
            None => 0,
        };
        if let (Some(b), true) = (&self.backing, avail > 0) {
            b.read_vectored_at(&mut sub_slices_mut(out, 0, avail), offset)?;
        }
        fill_zero(&mut sub_slices_mut(out, avail, n - avail));
        Ok(())
    }

    /// Plain data at a host offset into a scatter list, zeroes past the end of the file.
    fn read_data_v(&self, host: u64, out: &mut [IoSliceMut<'_>], n: usize) -> BlockResult<()> {
        let avail = self.meta.file_len.saturating_sub(host).min(n as u64) as usize;
        preadv_exact(&self.meta.file, &mut sub_slices_mut(out, 0, avail), host)
            .map_err(|e| BlockError::Corrupt(format!("reading data at {host:#x}: {e}")))?;
        fill_zero(&mut sub_slices_mut(out, avail, n - avail));
        Ok(())
    }

    /// How many bytes from `pos` (at most `max`) read the same way as the cluster holding
    /// `pos`, which is `first`: following clusters that are data right after it in the
    /// file, or unallocated / zero like it. Such a run is one `preadv` (or one backing read).
    fn run_len(&self, pos: u64, first: Cluster, max: usize) -> BlockResult<usize> {
        let cs = self.meta.header.cluster_size();
        let mut n = ((cs - pos % cs) as usize).min(max);
        if matches!(first, Cluster::Compressed { .. }) {
            return Ok(n);
        }
        let mut gc = pos / cs + 1;
        while n < max {
            let next = self.meta.lookup(gc).map_err(BlockError::Corrupt)?;
            let continues = match (first, next) {
                (Cluster::Data(h0), Cluster::Data(h)) => {
                    Some(h) == (h0 - h0 % cs).checked_add((gc - pos / cs) * cs)
                }
                (Cluster::Unallocated, Cluster::Unallocated) | (Cluster::Zero, Cluster::Zero) => {
                    true
                }
                _ => false,
            };
            if !continues {
                break;
            }
            n = (n + cs as usize).min(max);
            gc += 1;
        }
        Ok(n)
    }
}

impl BlockDevice for Qcow2Reader {
    fn size(&self) -> u64 {
        self.meta.header.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let cs = self.meta.header.cluster_size();
        let mut done = 0usize;
        let mut scratch: Vec<u8> = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.meta.lookup(pos / cs).map_err(BlockError::Corrupt)? {
                Cluster::Unallocated => self.read_backing(out, pos)?,
                Cluster::Zero => out.fill(0),
                Cluster::Data(host) => self
                    .meta
                    .read_data(host + in_cluster, out)
                    .map_err(BlockError::Corrupt)?,
                Cluster::Compressed { offset: c_off, len } => {
                    scratch.resize(cs as usize, 0);
                    self.meta
                        .read_compressed(c_off, len, &mut scratch)
                        .map_err(BlockError::Corrupt)?;
                    out.copy_from_slice(&scratch[in_cluster as usize..in_cluster as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }
    /// Straight into the caller's buffers: one `preadv` per run of clusters that lie one
    /// after the other in the file, one vectored backing read per unallocated run.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(self.size(), offset, total as u64)?;
        let cs = self.meta.header.cluster_size();
        let mut done = 0usize;
        let mut scratch: Vec<u8> = Vec::new();
        while done < total {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let first = self.meta.lookup(pos / cs).map_err(BlockError::Corrupt)?;
            let n = self.run_len(pos, first, total - done)?;
            let mut out = sub_slices_mut(bufs, done, n);
            match first {
                Cluster::Unallocated => self.read_backing_v(&mut out, pos, n)?,
                Cluster::Zero => fill_zero(&mut out),
                Cluster::Data(host) => self.read_data_v(host + in_cluster, &mut out, n)?,
                Cluster::Compressed { offset: c_off, len } => {
                    scratch.resize(cs as usize, 0);
                    self.meta
                        .read_compressed(c_off, len, &mut scratch)
                        .map_err(BlockError::Corrupt)?;
                    let at = in_cluster as usize;
                    scatter(&mut out, &scratch[at..at + n]);
                }
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(BlockStatus, u64)> {
        check_range(self.size(), offset, len)?;
        let cs = self.meta.header.cluster_size();
        let n = (cs - offset % cs).min(len).max(1);
        let status = match self.meta.lookup(offset / cs).map_err(BlockError::Corrupt)? {
            Cluster::Zero => BlockStatus::Zero,
            Cluster::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    let m = n.min(b.size() - offset);
                    return b.block_status(offset, m);
                }
                _ => BlockStatus::Zero,
            },
            _ => BlockStatus::Data,
        };
        Ok((status, n))
    }
}
