//! The host event set: accepting connections on the host socket, their `CONNECT` handshake,
//! readiness of host streams, and the timer that enforces handshake and connect deadlines.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::unix::{Handshake, HandshakeStatus};
use super::{
    FdOwner, Muxer, CONNECT_TIMEOUT, FIRST_LOCAL_PORT, HANDSHAKE_TIMEOUT, LISTENER_TOKEN,
    MAX_CONNECTIONS, MAX_HANDSHAKES, TIMER_TOKEN,
};
use crate::devices::vsock::connection::{ConnKey, ConnState, Connection, FlushOutcome};

impl Muxer {
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
}
