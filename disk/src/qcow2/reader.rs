//! kiln's own read-only qcow2 reader: used for images imago refuses (zstd-compressed
//! clusters) and as an independent second implementation in tests.

use std::sync::Arc;

use super::meta::{Cluster, Meta};
use crate::device::{check_range, BlockDevice, BlockResult, BlockStatus};
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
