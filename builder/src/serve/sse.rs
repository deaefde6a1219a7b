//! Server-Sent Events: one build's state and log, streamed to a page. Written straight to the
//! connection, one write per batch, and closed after `end`.
//!
//! Messages: `event: state` (the whole [`super::build::BuildState`], on every change),
//! `event: log` with `id: N` (one build event or kiln output line; a reconnecting
//! EventSource sends `Last-Event-ID` and gets the entries after it), and `event: end` once
//! the build has ended and everything was sent.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::build::BuildRun;

/// A comment line this often keeps proxies and the browser from timing the stream out, and
/// finds closed pages.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// A page that reads nothing for this long is dropped, freeing its stream slot.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Streams `run` from log entry `from` until the build ends or the page goes away.
pub fn stream(req: super::http::Request, run: Arc<BuildRun>, from: u64) {
    let mut w = req.into_stream();
    if w.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let head = "HTTP/1.1 200 OK\r\n\
                Content-Type: text/event-stream; charset=utf-8\r\n\
                Cache-Control: no-store\r\n\
                X-Content-Type-Options: nosniff\r\n\
                Connection: close\r\n\r\n\
                retry: 2000\n\n";
    if w.write_all(head.as_bytes())
        .and_then(|()| w.flush())
        .is_err()
    {
        return;
    }
    let (mut next, mut version) = (from, 0);
    loop {
        let u = run.wait_update(next, version, KEEPALIVE);
        let mut out = String::new();
        if let Some(state) = &u.state {
            out.push_str(&format!("event: state\ndata: {state}\n\n"));
        }
        for (id, entry) in &u.log {
            out.push_str(&format!("id: {id}\nevent: log\ndata: {entry}\n\n"));
        }
        // Done is set only after the last entry is in: this batch held everything.
        let end = u.done && u.log.is_empty() && u.state.is_none();
        if end {
            out.push_str("event: end\ndata: {}\n\n");
        } else if out.is_empty() {
            out.push_str(": keepalive\n\n");
        }
        if w.write_all(out.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
        {
            return;
        }
        if end {
            return;
        }
        next = u.next;
        version = u.version;
    }
}
