//! The connection manager: turns guest packets into host stream operations and host stream
//! events into packets for the guest's RX queue.
//!
//! Everything runs on one thread (the device's event thread). Host file descriptors live in
//! the muxer's own epoll set; the transport polls [`Muxer::as_raw_fd`] and calls
//! [`Muxer::process_host_events`] when it is readable. Per-connection state is bounded: a
//! connection buffers at most [`TX_BUF_SIZE`](super::connection::TX_BUF_SIZE) bytes for the
//! host, its pending control packets are flags, and the number of connections, handshakes
//! and connection-less RSTs are capped.
//!
//! [`Muxer`] is one struct whose work is split by direction:
//! - this file: its state, and keeping a connection's queues, epoll interest and timer in
//!   line with that state ([`Muxer::reset`], `reconcile`, `kill`).
//! - `to_host.rs`: guest -> host, packets the guest sent on its TX queue.
//! - `to_guest.rs`: host -> guest, filling the guest's RX buffers ([`RxFill`]).
//! - `host_events.rs`: the host event set: accepting host connections, their `CONNECT`
//!   handshake, host stream readiness and the deadline timer.
//! - [`unix`]: the Unix-socket side of the Firecracker convention.

mod host_events;
mod to_guest;
mod to_host;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, ConnState, Connection};
use super::device::VsockConfig;
use super::protocol::*;
use super::{Result, VsockError};
pub use to_guest::RxFill;
use unix::Handshake;

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

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours (bound in `new`); leave no stale path behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl AsRawFd for Muxer {
    /// The event set to poll: readable when [`Muxer::process_host_events`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
