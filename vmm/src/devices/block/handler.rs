//! The virtio-blk request logic: take chains off a queue, do the I/O on the disk, write the
//! status, put the chain on the used ring. Transport-independent: it sees only a
//! `virtio_queue::Queue` and a `GuestMemory`, so the kiln-vmm transport and the vhost-user
//! backend run the very same code.
//!
//! The queue walks here (through [`crate::devices::in_order`]) complete requests in the order
//! they were made available: a guest may put many requests in flight and the device works
//! through all of them on each kick. The request itself is split in two, [`prepare`] (check the chain, read the
//! header: no disk I/O) and running it, so [`super::scheduler`] can check chains on the queue's
//! thread and run several requests at once on others.

use std::sync::Arc;

use kiln_disk::{BlockDevice, BlockError};
use tracing::{debug, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemory, Permissions};

use crate::devices::in_order::{drain, drain_with, DrainError, Every, Suppress};

use super::chain::{read_stream, write_stream, ChainLayout, HostView};
use super::device::{
    BlockDeviceConfig, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE,
};

/// Size of the request header (type, reserved, sector).
const HEADER_LEN: u64 = 16;
/// Size of one discard / write-zeroes range.
const RANGE_LEN: u64 = 16;
/// Data moves between the disk and guest memory through a buffer of at most this many
/// bytes, so a request of any length costs bounded host memory.
const CHUNK: usize = 1 << 20;

/// Why a queue could not be processed at all. The transport logs it and stops serving that
/// queue until the driver resets the device.
pub type QueueError = DrainError;

/// The status a request ends with, and how many bytes the device wrote into the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub written: u32,
}

/// The request logic for one queue of a virtio-blk device.
pub struct BlockHandler {
    runner: Arc<Runner>,
    /// Whether the driver acked VIRTIO_BLK_F_FLUSH; without it the device is write-through.
    flush_acked: bool,
    buf: Vec<u8>,
}

/// What running a request needs besides the request itself: the disk and the device's fixed
/// description. Shared (behind an `Arc`) by a queue's handler and its I/O workers, so any of
/// them can run any request; every method takes `&self` because `BlockDevice` does.
pub(super) struct Runner {
    disk: Arc<dyn BlockDevice>,
    config: BlockDeviceConfig,
}

/// A request header: the type and the first sector.
#[derive(Debug, Clone, Copy)]
struct Header {
    rtype: u32,
    sector: u64,
}

/// A request whose chain passed every check ([`ChainLayout::parse`]) and whose header was
/// read: it holds only guest addresses, so it can be run on any thread against the memory
/// it was prepared with.
#[derive(Debug)]
pub struct Request {
    head: u16,
    layout: ChainLayout,
    /// Offset of the status byte in the writable stream.
    status_off: u64,
    /// `None` when the readable stream is shorter than a header (the request fails).
    header: Option<Header>,
}

impl Request {
    /// The chain's head index (what goes on the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Whether this is a FLUSH, which must not start before the requests made available
    /// before it have completed.
    pub fn is_flush(&self) -> bool {
        matches!(self.header, Some(h) if h.rtype == VIRTIO_BLK_T_FLUSH)
    }

    /// Bytes the chain's buffers hold, both ways: a measure of how long it will take.
    pub fn buffer_len(&self) -> u64 {
        let l = &self.layout;
        l.readable
            .iter()
            .chain(&l.writable)
            .map(|s| u64::from(s.len))
            .sum()
    }
}

/// A chain after [`prepare`]: either refused (the error status is already written) or a
/// request ready to run.
#[derive(Debug)]
pub enum Prepared {
    Refused { head: u16, completion: Completion },
    Ready(Request),
}

/// Check a chain and read its header, without touching the disk. A refused chain gets IOERR
/// in its status byte when it ends in a usable one (otherwise it is completed with nothing
/// written), with a logged reason.
pub fn prepare<M: GuestMemory>(chain: virtio_queue::DescriptorChain<&M>, mem: &M) -> Prepared {
    let head = chain.head_index();
    let layout = match ChainLayout::parse(chain) {
        Ok(l) => l,
        Err(r) => {
            warn!(head, "virtio-blk: refused request chain: {}", r.error);
            let written = match r.status_addr {
                Some(a) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, a).is_ok() => 1,
                _ => 0,
            };
            return Prepared::Refused {
                head,
                completion: Completion {
                    status: VIRTIO_BLK_S_IOERR as u8,
                    written,
                },
            };
        }
    };
    // The status byte is the last writable byte; the parse guaranteed there is one.
    let status_off = layout.writable_len() - 1;
    let mut hdr = [0u8; HEADER_LEN as usize];
    let header = (layout.readable_len() >= HEADER_LEN
        && read_stream(mem, &layout.readable, 0, &mut hdr))
    .then(|| Header {
        rtype: u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
        sector: u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]),
    });
    Prepared::Ready(Request {
        head,
        layout,
        status_off,
        header,
    })
}

impl BlockHandler {
    pub fn new(disk: Arc<dyn BlockDevice>, config: BlockDeviceConfig) -> Self {
        BlockHandler {
            runner: Arc::new(Runner { disk, config }),
            flush_acked: true,
            buf: Vec::new(),
        }
    }

    /// The driver's accepted feature bits.
    pub fn set_acked_features(&mut self, features: u64) {
        self.flush_acked = features & (1u64 << VIRTIO_BLK_F_FLUSH) != 0;
    }

    pub fn config(&self) -> &BlockDeviceConfig {
        &self.runner.config
    }

    /// The disk and configuration, for the queue's I/O workers.
    pub(super) fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// Whether the driver acked FLUSH (requests run elsewhere need to know).
    pub(super) fn flush_acked(&self) -> bool {
        self.flush_acked
    }

    /// Run a prepared request on this thread, with this handler's bounce buffer.
    pub(super) fn run<M: GuestMemory>(&mut self, req: &Request, mem: &M) -> Completion {
        self.runner.run(req, mem, self.flush_acked, &mut self.buf)
    }

    /// Serve every request the driver made available. Returns whether the driver must be
    /// notified (honouring VIRTIO_RING_F_EVENT_IDX).
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, QueueError> {
        drain(queue, mem, |chain| self.process_chain(chain, mem).written)
    }

    /// Serve every request the driver made available, calling `signal` as soon as a
    /// completed request needs the driver told (honouring VIRTIO_RING_F_EVENT_IDX), not once
    /// after the whole batch: with several requests in flight the guest starts on the first
    /// completion (and queues its next request) while the device works on the rest, as
    /// QEMU's own virtio-blk does. With EVENT_IDX the driver re-arms its used-event index only
    /// after it has looked at the used ring, so this costs an interrupt per batch the guest
    /// keeps up with, not one per request.
    pub fn process_queue_signalling<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        signal: &mut dyn FnMut(),
    ) -> Result<(), QueueError> {
        let mut every = Every(|chain: virtio_queue::DescriptorChain<&M>| {
            self.process_chain(chain, mem).written
        });
        drain_with(queue, mem, Suppress::WithEventIdx, &mut every, Some(signal))?;
        Ok(())
    }

    /// Serve one request. Never fails: a bad request gets an error status and a logged
    /// reason (a chain with no usable status byte gets nothing written).
    pub fn process_chain<M: GuestMemory>(
        &mut self,
        chain: virtio_queue::DescriptorChain<&M>,
        mem: &M,
    ) -> Completion {
        match prepare(chain, mem) {
            Prepared::Refused { completion, .. } => completion,
            Prepared::Ready(req) => self.run(&req, mem),
        }
    }
}

impl Runner {
    /// Run a prepared request and write its status. Never fails: a bad request gets an error
    /// status and a logged reason.
    pub(super) fn run<M: GuestMemory>(
        &self,
        req: &Request,
        mem: &M,
        flush_acked: bool,
        buf: &mut Vec<u8>,
    ) -> Completion {
        let (status, data_written) = self.execute(req, mem, flush_acked, buf);
        if !write_stream(mem, &req.layout.writable, req.status_off, &[status]) {
            warn!(head = req.head, "virtio-blk: cannot write the status byte");
            return Completion { status, written: 0 };
        }
        Completion {
            status,
            written: data_written.saturating_add(1),
        }
    }

    /// Do the request; returns (status, data bytes written into the chain before the status).
    fn execute<M: GuestMemory>(
        &self,
        req: &Request,
        mem: &M,
        flush_acked: bool,
        buf: &mut Vec<u8>,
    ) -> (u8, u32) {
        let Some(Header { rtype, sector }) = req.header else {
            warn!("virtio-blk: request shorter than its 16-byte header");
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        };
        let (l, status_off) = (&req.layout, req.status_off);
        let out_len = l.readable_len() - HEADER_LEN;
        let result = match rtype {
            VIRTIO_BLK_T_IN => self.read(l, sector, status_off, mem, buf),
            VIRTIO_BLK_T_OUT => self
                .write(l, sector, out_len, mem, flush_acked, buf)
                .map(|()| 0),
            VIRTIO_BLK_T_FLUSH => self.disk.flush().map_err(Status::from).map(|()| 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(l, status_off, mem),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.ranges(l, rtype, out_len, mem).map(|()| 0)
            }
            other => {
                debug!("virtio-blk: unsupported request type {other}");
                Err(Status::Unsupported)
            }
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(s) => (s.code(), 0),
        }
    }

    /// Byte range of a data request, checked against the disk.
    fn data_range(&self, sector: u64, len: u64) -> Result<u64, Status> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            warn!(
                len,
                "virtio-blk: data length is not a whole number of sectors"
            );
            return Err(Status::IoErr);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Status::IoErr)?;
        let end = offset.checked_add(len).ok_or(Status::IoErr)?;
        if end > self.config.capacity_sectors() * SECTOR_SIZE {
            warn!(sector, len, "virtio-blk: request past the end of the disk");
            return Err(Status::IoErr);
        }
        Ok(offset)
    }

    fn read<M: GuestMemory>(
        &self,
        l: &ChainLayout,
        sector: u64,
        data_len: u64,
        mem: &M,
        buf: &mut Vec<u8>,
    ) -> Result<u32, Status> {
        let offset = self.data_range(sector, data_len)?;
        let mut done = 0u64;
        while done < data_len {
            let n = (data_len - done).min(CHUNK as u64) as usize;
            // Straight into the guest's pages when they can be viewed in place; through the
            // bounce buffer otherwise (pages named twice, memory that refuses the view).
            if let Some(view) = HostView::new(mem, &l.writable, done, n, Permissions::Write) {
                view.fill(|iov| self.disk.read_vectored_at(iov, offset + done))?;
            } else {
                let b = chunk(buf, n);
                self.disk.read_at(b, offset + done)?;
                if !write_stream(mem, &l.writable, done, b) {
                    return Err(Status::IoErr);
                }
            }
            done += n as u64;
        }
        // The chain is under 4 GiB (the chain iterator stops past that), so this fits.
        Ok(u32::try_from(data_len).unwrap_or(u32::MAX))
    }

    fn write<M: GuestMemory>(
        &self,
        l: &ChainLayout,
        sector: u64,
        data_len: u64,
        mem: &M,
        flush_acked: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), Status> {
        if self.config.read_only {
            warn!("virtio-blk: write to a read-only disk");
            return Err(Status::IoErr);
        }
        let offset = self.data_range(sector, data_len)?;
        let mut done = 0u64;
        while done < data_len {
            let n = (data_len - done).min(CHUNK as u64) as usize;
            let at = HEADER_LEN + done;
            if let Some(view) = HostView::new(mem, &l.readable, at, n, Permissions::Read) {
                view.read(|iov| self.disk.write_vectored_at(iov, offset + done))?;
            } else {
                let b = chunk(buf, n);
                if !read_stream(mem, &l.readable, at, b) {
                    return Err(Status::IoErr);
                }
                self.disk.write_at(b, offset + done)?;
            }
            done += n as u64;
        }
        if !flush_acked {
            // Without VIRTIO_BLK_F_FLUSH the driver cannot ask for durability: write-through.
            self.disk.flush()?;
        }
        Ok(())
    }

    fn get_id<M: GuestMemory>(
        &self,
        l: &ChainLayout,
        data_len: u64,
        mem: &M,
    ) -> Result<u32, Status> {
        let n = (data_len as usize).min(ID_BYTES);
        if !write_stream(mem, &l.writable, 0, &self.config.serial[..n]) {
            return Err(Status::IoErr);
        }
        Ok(n as u32)
    }

    fn ranges<M: GuestMemory>(
        &self,
        l: &ChainLayout,
        rtype: u32,
        data_len: u64,
        mem: &M,
    ) -> Result<(), Status> {
        if self.config.read_only {
            // Not offered on a read-only disk, so a driver asking anyway gets "unsupported".
            return Err(Status::Unsupported);
        }
        if data_len == 0
            || !data_len.is_multiple_of(RANGE_LEN)
            || data_len / RANGE_LEN > u64::from(MAX_DISCARD_SEG)
        {
            warn!(data_len, "virtio-blk: bad discard/write-zeroes range list");
            return Err(Status::IoErr);
        }
        let count = data_len / RANGE_LEN;
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut r = [0u8; RANGE_LEN as usize];
            if !read_stream(mem, &l.readable, HEADER_LEN + i * RANGE_LEN, &mut r) {
                return Err(Status::IoErr);
            }
            let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            let allowed = if rtype == VIRTIO_BLK_T_WRITE_ZEROES {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                warn!(flags, "virtio-blk: unsupported range flags");
                return Err(Status::Unsupported);
            }
            if sectors > MAX_DISCARD_SECTORS {
                warn!(sectors, "virtio-blk: range larger than max_discard_sectors");
                return Err(Status::IoErr);
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.data_range(sector, len)?;
            ranges.push((offset, len));
        }
        // All ranges are checked before any is applied, so a bad list changes nothing.
        for (offset, len) in ranges {
            if rtype == VIRTIO_BLK_T_DISCARD {
                self.disk.discard(offset, len)?;
            } else {
                self.disk.write_zeroes(offset, len)?;
            }
        }
        Ok(())
    }
}

/// The first `n` bytes of the reusable bounce buffer, grown on demand (at most [`CHUNK`]).
fn chunk(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// A failed request's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    IoErr,
    Unsupported,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

impl From<BlockError> for Status {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Unsupported(what) => {
                debug!("virtio-blk: disk does not support {what}");
                Status::Unsupported
            }
            other => {
                warn!("virtio-blk: disk error: {other}");
                Status::IoErr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use kiln_disk::BlockResult;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::block::BlockOptions;

    struct MemDisk(Mutex<Vec<u8>>);

    impl BlockDevice for MemDisk {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> BlockResult<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
            self.write_zeroes(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> BlockResult<()> {
            self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    /// Three 512-byte reads in flight on a queue of 16; returns, for each `signal` call, how
    /// many requests were on the used ring at that moment, and the final used index.
    fn three_reads(event_idx: bool) -> (Vec<u16>, u16) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut descs = Vec::new();
        for i in 0..3u64 {
            let base = 0x8000 + i * 0x1000;
            let next = descs.len() as u16;
            mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(base)).unwrap();
            mem.write_obj(i, GuestAddress(base + 8)).unwrap();
            let f = VRING_DESC_F_NEXT as u16;
            let w = VRING_DESC_F_WRITE as u16;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base,
                16,
                f,
                next + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base + 0x100,
                512,
                f | w,
                next + 2,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                base + 0x400,
                1,
                w,
                0,
            )));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        let disk = Arc::new(MemDisk(Mutex::new(vec![7u8; 4096])));
        let config = BlockDeviceConfig::new(4096, false, &BlockOptions::default());
        let mut h = BlockHandler::new(disk, config);
        let used = vq.used().idx();
        let mut seen = Vec::new();
        h.process_queue_signalling(&mut q, &mem, &mut || seen.push(used.load()))
            .unwrap();
        let data: u8 = mem.read_obj(GuestAddress(0x8000 + 0x100)).unwrap();
        assert_eq!(data, 7, "the read reached guest memory");
        (seen, used.load())
    }

    #[test]
    fn signals_on_the_first_completion_not_after_the_batch() {
        // EVENT_IDX with used_event 0: the driver wants to hear as soon as one request is
        // done, and not again until it has re-armed used_event.
        let (seen, used) = three_reads(true);
        assert_eq!(used, 3);
        assert_eq!(seen, vec![1]);
    }

    #[test]
    fn signals_every_completion_without_event_idx() {
        // No EVENT_IDX and no NO_INTERRUPT flag: each completion is signalled.
        let (seen, used) = three_reads(false);
        assert_eq!(used, 3);
        assert_eq!(seen, vec![1, 2, 3]);
    }
}
