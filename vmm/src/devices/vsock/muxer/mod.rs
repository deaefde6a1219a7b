//! The connection manager: turns guest packets into host stream operations and host stream
//! events into packets for the guest's RX queue.
//!
//! Everything runs on one thread (the device's event thread). Host file descriptors live in
//! the muxer's own epoll set; the transport polls [`Muxer::as_raw_fd`] and calls
//! [`Muxer::process_host_events`] when it is readable. Per-connection state is bounded: a
//! connection buffers at most [`TX_BUF_SIZE`] bytes for the host, its pending control packets
//! are flags, and the number of connections, handshakes and connection-less RSTs are capped.

pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{
    volatile_io, ConnKey, ConnState, Connection, FlushOutcome, SendOutcome, TX_BUF_SIZE,
};
use super::device::VsockConfig;
use super::protocol::*;
use super::{Result, VsockError};
use unix::{Handshake, HandshakeStatus};

/// Most connections open at once; more are refused (RST to the guest, closed stream to the host).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Most RSTs for unknown connections waiting for RX buffers; more are dropped (the guest
/// times out instead of being told).
const MAX_PENDING_RSTS: usize = 1024;
/// How long the guest has to answer a host `CONNECT` before the host stream is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host connection may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// First port handed to host-initiated connections (as Firecracker does, well above the
/// ports guests listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const TIMER_TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
enum FdOwner {
    Handshake,
    Conn(ConnKey),
}

/// An RST for a connection the device does not know (or no longer knows).
#[derive(Clone, Copy, Debug)]
struct RstTarget {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
}

/// The connection manager.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    fd_owner: HashMap<RawFd, FdOwner>,
    handshakes: HashMap<RawFd, Handshake>,
    ctl_queue: VecDeque<ConnKey>,
    data_queue: VecDeque<ConnKey>,
    rst_queue: VecDeque<RstTarget>,
    next_local_port: u32,
}

impl Muxer {
    /// Binds the host socket at `uds_path` and prepares the event set.
    pub fn new(config: VsockConfig, uds_path: &Path) -> Result<Self> {
        let listener =
            unix::bind_listener(uds_path).map_err(|source| VsockError::BindHostSocket {
                path: uds_path.to_owned(),
                source,
            })?;
        let epoll = Epoll::new().map_err(VsockError::Event)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Event(e.into()))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Event)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockError::Event)?;
        Ok(Self {
            guest_cid: config.guest_cid(),
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            fd_owner: HashMap::new(),
            handshakes: HashMap::new(),
            ctl_queue: VecDeque::new(),
            data_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of open connections.
    pub fn num_connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (the host streams are closed, which is all a Unix stream has of
    /// RST) and everything queued for the guest. Host connections still sending their
    /// handshake are kept: they are not tied to the guest yet.
    pub fn reset(&mut self) {
        if !self.conns.is_empty() {
            info!(
                connections = self.conns.len(),
                "vsock reset: closing all host connections"
            );
        }
        for (_, conn) in self.conns.drain() {
            if conn.interest != 0 {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.fd_owner.remove(&conn.stream.as_raw_fd());
        }
        self.ctl_queue.clear();
        self.data_queue.clear();
        self.rst_queue.clear();
        self.update_timer();
    }

    // ---------------------------------------------------------------- guest -> host

    /// Handles one packet the guest sent on the TX queue. `data` is the payload of the packet
    /// (already bounded by the packet parser). Never fails: whatever is wrong with the packet
    /// is answered with RST or dropped, and logged.
    pub fn handle_tx_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid {
            warn!(
                src_cid = hdr.src_cid,
                guest_cid = self.guest_cid,
                "vsock: dropping packet with a spoofed source CID"
            );
            return;
        }
        if hdr.dst_cid != HOST_CID {
            debug!(
                dst_cid = hdr.dst_cid,
                "vsock: packet for a CID other than the host"
            );
            if hdr.op != OP_RST {
                self.push_rst(RstTarget {
                    src_cid: hdr.dst_cid,
                    src_port: hdr.dst_port,
                    dst_port: hdr.src_port,
                });
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            debug!(type_ = hdr.type_, "vsock: unsupported socket type");
            if hdr.op != OP_RST {
                self.push_rst_key(key);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                op => {
                    debug!(
                        ?key,
                        op = op_name(op),
                        "vsock: packet for unknown connection"
                    );
                    self.push_rst_key(key);
                }
            }
            return;
        }
        self.handle_conn_packet(key, hdr, data);
        self.reconcile(key);
    }

    fn handle_conn_packet<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE => {
                if let ConnState::LocalInit { .. } = conn.state {
                    conn.state = ConnState::Established;
                    conn.queue_ok_reply();
                    if let Err(e) = conn.flush_to_host() {
                        debug!(?key, error = %e, "vsock: host went away before OK");
                        self.kill(key, true);
                    }
                } else {
                    warn!(?key, "vsock: RESPONSE on an established connection");
                    self.kill(key, true);
                }
            }
            OP_RW => {
                if conn.state != ConnState::Established || conn.peer_shut_send {
                    warn!(?key, "vsock: data on a connection not open for it");
                    self.kill(key, true);
                    return;
                }
                let Some(data) = data else {
                    return;
                };
                match conn.send_to_host(data) {
                    Ok(SendOutcome::Ok) => {}
                    Ok(SendOutcome::CreditViolation) => {
                        warn!(
                            ?key,
                            buffered = conn.buffered(),
                            len = data.len(),
                            "vsock: guest exceeded its credit"
                        );
                        self.kill(key, true);
                    }
                    Err(e) => {
                        debug!(?key, error = %e, "vsock: host stream write failed");
                        self.kill(key, true);
                    }
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.pending.credit_update = true,
            OP_SHUTDOWN => {
                conn.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
            }
            OP_RST => {
                if conn.peer_shut_send && !conn.drained() {
                    // A guest that closed cleanly and then timed out waiting for our RST:
                    // the data it sent must still reach the host before the stream closes.
                    conn.peer_shut_rcv = true;
                } else {
                    self.kill(key, false);
                }
            }
            op => {
                warn!(?key, op, "vsock: unexpected op on a connection");
                self.kill(key, true);
            }
        }
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!(
                ?key,
                "vsock: connection limit reached, refusing guest connection"
            );
            self.push_rst_key(key);
            return;
        }
        let path = unix::guest_port_path(&self.uds_path, key.local_port);
        match unix::connect_nonblocking(&path) {
            Ok(stream) => {
                debug!(?key, path = %path.display(), "vsock: guest connected to host listener");
                let conn = Connection::peer_init(key, stream, hdr.buf_alloc, hdr.fwd_cnt);
                self.insert_conn(conn);
            }
            Err(e) => {
                debug!(?key, path = %path.display(), error = %e, "vsock: no host listener");
                self.push_rst_key(key);
            }
        }
    }

    fn insert_conn(&mut self, conn: Connection) {
        let key = conn.key;
        self.fd_owner
            .insert(conn.stream.as_raw_fd(), FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.reconcile(key);
        self.update_timer();
    }

    /// Removes a connection and closes its host stream; with `rst`, tells the guest.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            if conn.interest != 0 {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_owner.remove(&fd);
        }
        if rst {
            self.push_rst_key(key);
        }
    }

    fn push_rst_key(&mut self, key: ConnKey) {
        self.push_rst(RstTarget {
            src_cid: HOST_CID,
            src_port: key.local_port,
            dst_port: key.peer_port,
        });
    }

    fn push_rst(&mut self, t: RstTarget) {
        if self.rst_queue.len() >= MAX_PENDING_RSTS {
            warn!("vsock: too many RSTs pending (guest not taking RX buffers); dropping one");
            return;
        }
        self.rst_queue.push_back(t);
    }

    /// Brings a connection's queues, shutdown progress and epoll interest in line with its
    /// state. Called after anything changes a connection.
    fn reconcile(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.peer_shut_send && conn.drained() && !conn.host_write_closed {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.host_write_closed = true;
        }
        if conn.peer_shut_rcv && conn.peer_shut_send && conn.drained() {
            debug!(?key, "vsock: connection closed by the guest");
            self.kill(key, true);
            return;
        }
        if conn.state == ConnState::Established
            && !conn.peer_shut_send
            && conn.needs_credit_update()
        {
            conn.pending.credit_update = true;
        }
        if conn.pending.any() && !conn.ctl_queued {
            conn.ctl_queued = true;
            self.ctl_queue.push_back(key);
        }
        if conn.can_send_data() && !conn.data_queued {
            conn.data_queued = true;
            self.data_queue.push_back(key);
        }
        let want = conn.desired_interest();
        if want != conn.interest {
            let fd = conn.stream.as_raw_fd();
            let ev = EpollEvent::new(EventSet::from_bits_truncate(want), fd as u64);
            let res = match (conn.interest, want) {
                (0, _) => self.epoll.ctl(ControlOperation::Add, fd, ev),
                (_, 0) => self.epoll.ctl(ControlOperation::Delete, fd, ev),
                _ => self.epoll.ctl(ControlOperation::Modify, fd, ev),
            };
            match res {
                Ok(()) => conn.interest = want,
                Err(e) => {
                    warn!(?key, error = %e, "vsock: epoll registration failed");
                    self.kill(key, true);
                }
            }
        }
    }

    // ---------------------------------------------------------------- host -> guest

    /// Whether there is anything to put on the RX queue.
    pub fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ctl_queue.is_empty() || !self.data_queue.is_empty()
    }

    /// Writes the next packet for the guest into an RX buffer: `hdr_out` receives the header
    /// and `data` (the buffer's payload area) the payload.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        hdr_out: &mut [u8; HEADER_SIZE],
        data: Option<&VolatileSlice<'_, B>>,
    ) -> RxFill {
        // Each round either returns a packet or removes an entry from a queue; entries added
        // back (EOF turning into SHUTDOWN, errors into RST) are bounded by the connections.
        loop {
            if let Some(t) = self.rst_queue.pop_front() {
                *hdr_out = Header {
                    src_cid: t.src_cid,
                    dst_cid: self.guest_cid,
                    src_port: t.src_port,
                    dst_port: t.dst_port,
                    type_: TYPE_STREAM,
                    op: OP_RST,
                    ..Default::default()
                }
                .to_bytes();
                return RxFill::Packet(HEADER_SIZE as u32);
            }
            if let Some(key) = self.ctl_queue.pop_front() {
                if let Some(n) = self.fill_ctl(key, hdr_out) {
                    return RxFill::Packet(n);
                }
                continue;
            }
            let Some(key) = self.data_queue.pop_front() else {
                return RxFill::Nothing;
            };
            match self.fill_data(key, hdr_out, data) {
                DataFill::Packet(n) => return RxFill::Packet(n),
                DataFill::Nothing => continue,
                DataFill::NoRoom => {
                    // The buffer has no payload area: the packet cannot carry data. Keep the
                    // connection queued for the next buffer.
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.data_queued = true;
                        self.data_queue.push_front(key);
                    }
                    return RxFill::NoRoom;
                }
            }
        }
    }

    fn conn_header(&self, conn: &Connection, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: conn.key.local_port,
            dst_port: conn.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: conn.fwd_cnt.0,
        }
    }

    fn fill_ctl(&mut self, key: ConnKey, hdr_out: &mut [u8; HEADER_SIZE]) -> Option<u32> {
        let conn = self.conns.get_mut(&key)?;
        conn.ctl_queued = false;
        let p = &mut conn.pending;
        let (op, flags) = if p.request {
            p.request = false;
            (OP_REQUEST, 0)
        } else if p.response {
            p.response = false;
            (OP_RESPONSE, 0)
        } else if p.shutdown != 0 {
            let f = p.shutdown;
            p.shutdown = 0;
            (OP_SHUTDOWN, f)
        } else if p.credit_update {
            p.credit_update = false;
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        let conn = self.conns.get(&key)?;
        *hdr_out = self.conn_header(conn, op, flags, 0).to_bytes();
        let conn = self.conns.get_mut(&key)?;
        conn.last_fwd_cnt_to_peer = conn.fwd_cnt;
        // Every packet carries the current credit: a separate update would say nothing new.
        conn.pending.credit_update = false;
        self.reconcile(key);
        Some(HEADER_SIZE as u32)
    }

    fn fill_data<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        hdr_out: &mut [u8; HEADER_SIZE],
        data: Option<&VolatileSlice<'_, B>>,
    ) -> DataFill {
        let Some(conn) = self.conns.get_mut(&key) else {
            return DataFill::Nothing;
        };
        conn.data_queued = false;
        if !conn.can_send_data() {
            self.reconcile(key);
            return DataFill::Nothing;
        }
        let Some(data) = data.filter(|d| !d.is_empty()) else {
            return DataFill::NoRoom;
        };
        let max = data
            .len()
            .min(conn.peer_credit() as usize)
            .min(MAX_PKT_DATA as usize);
        let Ok(mut dst) = data.subslice(0, max) else {
            return DataFill::Nothing;
        };
        let res = loop {
            match conn.stream.read_volatile(&mut dst).map_err(volatile_io) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match res {
            Ok(0) => {
                debug!(?key, "vsock: host closed its side");
                conn.readable = false;
                conn.host_eof = true;
                conn.pending.shutdown |= SHUTDOWN_SEND;
                self.reconcile(key);
                DataFill::Nothing
            }
            Ok(n) => {
                let n32 = n as u32; // n <= MAX_PKT_DATA
                conn.rx_cnt += Wrapping(n32);
                conn.last_fwd_cnt_to_peer = conn.fwd_cnt;
                conn.pending.credit_update = false;
                let conn = &self.conns[&key];
                *hdr_out = self.conn_header(conn, OP_RW, 0, n32).to_bytes();
                self.reconcile(key);
                DataFill::Packet(HEADER_SIZE as u32 + n32)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.readable = false;
                self.reconcile(key);
                DataFill::Nothing
            }
            Err(e) => {
                debug!(?key, error = %e, "vsock: host stream read failed");
                self.kill(key, true);
                DataFill::Nothing
            }
        }
    }

    // ---------------------------------------------------------------- host events

    /// Handles everything ready in the host event set without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // Bounded so a flood of host activity cannot starve the guest queues.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "vsock: epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn dispatch(&mut self, token: u64, set: EventSet) {
        match token {
            LISTENER_TOKEN => self.accept_host_connections(),
            TIMER_TOKEN => self.on_timer(),
            fd => {
                let fd = fd as RawFd;
                match self.fd_owner.get(&fd).copied() {
                    Some(FdOwner::Handshake) => self.advance_handshake(fd),
                    Some(FdOwner::Conn(key)) => self.on_conn_event(key, set),
                    None => {}
                }
            }
        }
    }

    fn accept_host_connections(&mut self) {
        for _ in 0..MAX_HANDSHAKES {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "vsock: accept on the host socket failed");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                warn!("vsock: too many host connections in handshake; closing one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!(error = %e, "vsock: cannot make host stream non-blocking");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                warn!(error = %e, "vsock: epoll registration failed");
                continue;
            }
            self.fd_owner.insert(fd, FdOwner::Handshake);
            self.handshakes.insert(
                fd,
                Handshake::new(stream, Instant::now() + HANDSHAKE_TIMEOUT),
            );
            self.update_timer();
            // The line may already be there.
            self.advance_handshake(fd);
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        let h = self.handshakes.remove(&fd)?;
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fd_owner.remove(&fd);
        self.update_timer();
        Some(h)
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match h.advance() {
            Ok(HandshakeStatus::Incomplete) => {}
            Ok(HandshakeStatus::Connect(port)) => {
                let Some(h) = self.drop_handshake(fd) else {
                    return;
                };
                self.host_connect(h.stream, port);
            }
            Err(e) => {
                debug!(error = %e, "vsock: host handshake failed");
                self.drop_handshake(fd);
            }
        }
    }

    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!(
                peer_port,
                "vsock: connection limit reached, refusing host CONNECT"
            );
            return;
        }
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            warn!(peer_port, "vsock: no free local port");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        debug!(?key, "vsock: host CONNECT");
        let conn = Connection::local_init(key, stream, Instant::now() + CONNECT_TIMEOUT);
        self.insert_conn(conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = if port == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn on_conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if (set.contains(EventSet::IN) || trouble) && conn.wants_host_read() {
            conn.readable = true;
        }
        if (set.contains(EventSet::OUT) || trouble) && !conn.out_is_empty() {
            match conn.flush_to_host() {
                Ok(FlushOutcome::Drained) | Ok(FlushOutcome::Blocked) => {}
                Err(e) => {
                    debug!(?key, error = %e, "vsock: host stream write failed");
                    self.kill(key, true);
                    return;
                }
            }
        }
        if trouble && !conn.wants_host_read() && conn.out_is_empty() {
            // Nothing left to read or write, and the host is gone: nothing will clear the
            // condition, so the connection ends here.
            if matches!(conn.state, ConnState::LocalInit { .. }) || conn.host_eof {
                self.kill(key, true);
                return;
            }
        }
        self.reconcile(key);
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            debug!("vsock: host handshake timed out");
            self.drop_handshake(fd);
        }
        let timed_out: Vec<(ConnKey, bool)> = self
            .conns
            .values()
            .filter(|c| matches!(c.state, ConnState::LocalInit { deadline } if deadline <= now))
            .map(|c| (c.key, !c.pending.request))
            .collect();
        for (key, request_sent) in timed_out {
            info!(
                ?key,
                request_sent, "vsock: guest did not answer CONNECT in time; closing host stream"
            );
            // An RST only means something to a guest that saw the REQUEST (a guest without
            // RX buffers, e.g. still booting, never did).
            self.kill(key, request_sent);
        }
        self.update_timer();
    }

    /// Runs the tick timer only while something has a deadline.
    fn update_timer(&mut self) {
        let need = !self.handshakes.is_empty()
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, ConnState::LocalInit { .. }));
        if need == self.timer_armed {
            return;
        }
        let res = if need {
            self.timer.reset(TIMER_TICK, Some(TIMER_TICK))
        } else {
            self.timer.clear()
        };
        match res {
            Ok(()) => self.timer_armed = need,
            Err(e) => warn!(error = %e, "vsock: timerfd update failed"),
        }
    }
}

/// What [`Muxer::fill_rx`] put in an RX buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RxFill {
    /// A packet of this many bytes (header plus payload).
    Packet(u32),
    /// Nothing to send after all (a stream that looked readable had no data).
    Nothing,
    /// Data is waiting but the buffer has no payload area.
    NoRoom,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours (bound in `new`); leave no stale path behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

enum DataFill {
    Packet(u32),
    Nothing,
    NoRoom,
}

impl AsRawFd for Muxer {
    /// The event set to poll: readable when [`Muxer::process_host_events`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
