//! One vsock stream connection: its state machine, credit accounting and the bounded buffer of
//! guest data waiting for the host stream to accept it.
//!
//! Credit (virtio spec 5.10.6.3): each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it has consumed). A sender may have at most
//! `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes in flight. The device's receive buffer is
//! [`TX_BUF_SIZE`] per connection, so a guest that respects credit can never make it grow past
//! that; one that does not gets an RST.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{VolatileSlice, WriteVolatile};

/// Bytes of guest data the device buffers per connection (the `buf_alloc` it advertises).
pub const TX_BUF_SIZE: u32 = 256 * 1024;

/// A credit update is volunteered when the guest believes less than this much of the device
/// buffer is free. Linux guests never send CREDIT_REQUEST on their own, so without this a
/// guest that filled the buffer would wait forever.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 2;

/// A connection's identity from the device's side: (host port, guest port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// The host asked (`CONNECT`): a REQUEST is (or will be) on its way to the guest, and the
    /// host gets `OK` or a closed stream depending on the answer, or a closed stream at
    /// `deadline`.
    LocalInit { deadline: Instant },
    /// Both sides may exchange data.
    Established,
}

/// Control packets a connection has pending for the guest. They are flags, not a queue, so a
/// connection's pending control traffic is bounded no matter what the guest or host does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCtl {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    pub shutdown: u32,
}

impl PendingCtl {
    pub fn any(&self) -> bool {
        self.request || self.response || self.credit_update || self.shutdown != 0
    }
}

/// What flushing the host-bound buffer achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything queued was written (or nothing was queued).
    Drained,
    /// The host stream is full; wait for it to become writable.
    Blocked,
}

/// The outcome of offering guest data to a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Ok,
    /// The guest sent more than its credit allowed.
    CreditViolation,
}

/// One connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: ConnState,
    /// The guest's receive buffer size, from the last packet it sent.
    pub peer_buf_alloc: u32,
    /// Bytes the guest says it consumed, from the last packet it sent.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes received from the guest.
    pub recv_cnt: Wrapping<u32>,
    /// Bytes of guest data written to the host stream.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_to_peer: Wrapping<u32>,
    /// Bytes waiting for the host stream: guest data, preceded by `out_uncounted` bytes the
    /// device itself wrote (the `OK <port>\n` reply), which do not count as forwarded data.
    out: VecDeque<u8>,
    out_uncounted: usize,
    /// The guest will not receive more (it sent SHUTDOWN with RCV).
    pub peer_shut_rcv: bool,
    /// The guest will not send more (it sent SHUTDOWN with SEND).
    pub peer_shut_send: bool,
    /// The host stream reached end of file; SHUTDOWN(SEND) went to the guest.
    pub host_eof: bool,
    /// The host stream's write side was shut down after the guest's SEND shutdown.
    pub host_write_closed: bool,
    /// The host stream may have data: epoll interest in reading is off until a read would block.
    pub readable: bool,
    pub pending: PendingCtl,
    /// Whether the key is in the muxer's control queue.
    pub ctl_queued: bool,
    /// Whether the key is in the muxer's data queue.
    pub data_queued: bool,
    /// The epoll interest currently registered (0 = not registered).
    pub interest: u32,
}

impl Connection {
    /// A connection the guest asked for (it sent REQUEST); the device answers RESPONSE.
    pub fn peer_init(key: ConnKey, stream: UnixStream, peer_buf_alloc: u32, peer_fwd: u32) -> Self {
        let mut c = Self::new(key, stream, ConnState::Established);
        c.peer_buf_alloc = peer_buf_alloc;
        c.peer_fwd_cnt = Wrapping(peer_fwd);
        c.pending.response = true;
        c
    }

    /// A connection the host asked for with `CONNECT`; the device sends REQUEST.
    pub fn local_init(key: ConnKey, stream: UnixStream, deadline: Instant) -> Self {
        let mut c = Self::new(key, stream, ConnState::LocalInit { deadline });
        c.pending.request = true;
        c
    }

    fn new(key: ConnKey, stream: UnixStream, state: ConnState) -> Self {
        Self {
            key,
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            out: VecDeque::new(),
            out_uncounted: 0,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_eof: false,
            host_write_closed: false,
            readable: false,
            pending: PendingCtl::default(),
            ctl_queued: false,
            data_queued: false,
            interest: 0,
        }
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the device may still send to the guest. A guest reporting a `fwd_cnt` ahead of
    /// what it was sent gets no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the device wants to read from the host stream (to send data to the guest).
    pub fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established && !self.peer_shut_rcv && !self.host_eof
    }

    /// Whether the connection has data it can send to the guest right now.
    pub fn can_send_data(&self) -> bool {
        self.wants_host_read() && self.readable && self.peer_credit() > 0
    }

    /// The epoll interest this connection needs now.
    pub fn desired_interest(&self) -> u32 {
        let mut ev = 0;
        if self.wants_host_read() && !self.readable {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.out.is_empty() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    /// Bytes of guest data buffered for the host.
    pub fn buffered(&self) -> usize {
        self.out.len() - self.out_uncounted
    }

    pub fn out_is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Queues the `OK <port>\n` reply for a host-initiated connection.
    pub fn queue_ok_reply(&mut self) {
        let line = format!("OK {}\n", self.key.local_port);
        // The reply precedes any guest data: it is only queued when the connection becomes
        // established, before the guest can have sent anything.
        for b in line.bytes().rev() {
            self.out.push_front(b);
        }
        self.out_uncounted += line.len();
    }

    /// Takes guest data for the host stream: written straight through when nothing is queued,
    /// the rest buffered. Returns an error only for a host stream that failed.
    pub fn send_to_host<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> io::Result<SendOutcome> {
        let len = data.len();
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        if self.buffered().saturating_add(len) > TX_BUF_SIZE as usize {
            return Ok(SendOutcome::CreditViolation);
        }
        self.recv_cnt += Wrapping(len32);
        let mut written = 0usize;
        if self.out.is_empty() {
            loop {
                let rest = data
                    .subslice(written, len - written)
                    .map_err(io::Error::other)?;
                if rest.is_empty() {
                    break;
                }
                match self.stream.write_volatile(&rest).map_err(volatile_io) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(u32::MAX));
        }
        if written < len {
            let rest = data
                .subslice(written, len - written)
                .map_err(io::Error::other)?;
            let start = self.out.len();
            self.out.resize(start + rest.len(), 0);
            let (a, b) = self.out.as_mut_slices();
            // The VecDeque may wrap: copy into its two halves in order.
            copy_into_deque_tail(&rest, a, b, start)?;
        }
        Ok(SendOutcome::Ok)
    }

    /// Writes buffered bytes to the host stream until it would block.
    pub fn flush_to_host(&mut self) -> io::Result<FlushOutcome> {
        while !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            let n = match self.stream.write(front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(FlushOutcome::Blocked)
                }
                Err(e) => return Err(e),
            };
            self.out.drain(..n);
            let uncounted = n.min(self.out_uncounted);
            self.out_uncounted -= uncounted;
            self.fwd_cnt += Wrapping(u32::try_from(n - uncounted).unwrap_or(u32::MAX));
        }
        Ok(FlushOutcome::Drained)
    }

    /// Whether the guest should be told about freed buffer space now: it has been told of
    /// less than the threshold of free space, and more has been freed since.
    pub fn needs_credit_update(&self) -> bool {
        if self.fwd_cnt == self.last_fwd_cnt_to_peer {
            return false;
        }
        let used_in_guest_view = (self.recv_cnt - self.last_fwd_cnt_to_peer).0;
        let free_in_guest_view = TX_BUF_SIZE.saturating_sub(used_in_guest_view);
        free_in_guest_view < CREDIT_UPDATE_THRESHOLD
    }

    /// Whether everything the guest sent has reached the host stream.
    pub fn drained(&self) -> bool {
        self.out.is_empty()
    }
}

/// The I/O error inside a volatile-memory error (what socket reads and writes fail with).
pub fn volatile_io(e: vm_memory::VolatileMemoryError) -> io::Error {
    match e {
        vm_memory::VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

fn copy_into_deque_tail<B: BitmapSlice>(
    src: &VolatileSlice<'_, B>,
    a: &mut [u8],
    b: &mut [u8],
    start: usize,
) -> io::Result<()> {
    let total = src.len();
    let mut copied = 0usize;
    if start < a.len() {
        let dst = &mut a[start..];
        let n = dst.len().min(total);
        src.subslice(0, n)
            .map_err(io::Error::other)?
            .copy_to(&mut dst[..n]);
        copied = n;
    }
    if copied < total {
        let b_start = start.saturating_sub(a.len());
        let n = total - copied;
        let dst = b
            .get_mut(b_start..b_start + n)
            .ok_or_else(|| io::Error::other("deque slices shorter than reserved"))?;
        src.subslice(copied, n)
            .map_err(io::Error::other)?
            .copy_to(dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let key = ConnKey {
            local_port: 5,
            peer_port: 6,
        };
        (Connection::peer_init(key, a, 4096, 0), b)
    }

    #[test]
    fn peer_credit_accounts_in_flight_bytes() {
        let (mut c, _b) = pair();
        assert_eq!(c.peer_credit(), 4096);
        c.rx_cnt = Wrapping(1000);
        assert_eq!(c.peer_credit(), 3096);
        c.peer_fwd_cnt = Wrapping(1000);
        assert_eq!(c.peer_credit(), 4096);
        // A guest claiming to have consumed more than it was sent gets no credit.
        c.peer_fwd_cnt = Wrapping(2000);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.rx_cnt = Wrapping(5);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 4);
        assert_eq!(c.peer_credit(), 4096 - 10);
    }

    #[test]
    fn buffered_data_is_bounded_by_tx_buf_size() {
        let (mut c, _b) = pair();
        let mut big = vec![7u8; 64 * 1024];
        let slice = VolatileSlice::from(big.as_mut_slice());
        let mut accepted = 0usize;
        while c.send_to_host(&slice).expect("send") == SendOutcome::Ok {
            accepted += slice.len();
            assert!(accepted < 64 * 1024 * 1024, "never refused");
        }
        assert!(c.buffered() <= TX_BUF_SIZE as usize);
        assert!(c.buffered() + slice.len() > TX_BUF_SIZE as usize);
    }

    #[test]
    fn ok_reply_is_not_counted_as_forwarded() {
        let (mut c, mut b) = pair();
        c.queue_ok_reply();
        let mut data = *b"hello";
        c.send_to_host(&VolatileSlice::from(&mut data[..]))
            .expect("send");
        assert_eq!(c.flush_to_host().expect("flush"), FlushOutcome::Drained);
        assert_eq!(c.fwd_cnt.0, 5);
        let mut got = [0u8; 10];
        use std::io::Read;
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"OK 5\nhello");
    }

    #[test]
    fn credit_update_only_when_guest_view_is_low() {
        let (mut c, _b) = pair();
        c.recv_cnt = Wrapping(1000);
        c.fwd_cnt = Wrapping(1000);
        assert!(!c.needs_credit_update());
        c.recv_cnt = Wrapping(TX_BUF_SIZE);
        c.fwd_cnt = Wrapping(TX_BUF_SIZE);
        assert!(c.needs_credit_update());
        c.last_fwd_cnt_to_peer = c.fwd_cnt;
        assert!(!c.needs_credit_update());
    }
}
