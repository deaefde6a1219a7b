//! Host -> guest: filling the guest's RX buffers with what the muxer has queued for it
//! (connection-less RSTs first, then control packets, then data read from host streams).

use std::io;
use std::num::Wrapping;

use tracing::debug;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice};

use super::Muxer;
use crate::devices::vsock::connection::{volatile_io, ConnKey, Connection, TX_BUF_SIZE};
use crate::devices::vsock::protocol::*;

impl Muxer {
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

enum DataFill {
    Packet(u32),
    Nothing,
    NoRoom,
}
