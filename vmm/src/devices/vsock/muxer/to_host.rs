//! Guest -> host: the packets the guest sent on its TX queue become connections to host
//! listeners, writes on host streams, shutdowns and resets.

use tracing::{debug, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::{unix, Muxer, RstTarget, MAX_CONNECTIONS};
use crate::devices::vsock::connection::{ConnKey, ConnState, Connection, SendOutcome};
use crate::devices::vsock::protocol::*;

impl Muxer {
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
}
