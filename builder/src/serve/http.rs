//! The editor's HTTP/1.1 layer, bounded so that connections nobody has authenticated cannot
//! exhaust threads or memory: one thread accepts connections and reads every request head
//! without blocking (`poll`), and only a complete head goes to a fixed pool of workers.
//!
//! Limits: at most [`MAX_PENDING`] connections waiting for their head (a new one evicts the
//! oldest), each with [`HEAD_TIMEOUT`] from accept to a complete head of at most [`MAX_HEAD`]
//! bytes; at most [`QUEUE`] complete requests waiting for a worker (more get 503); one request
//! per connection (`Connection: close`), so an idle keep-alive connection never holds a
//! worker. Bodies are read only when the handler asks (after its checks), by `Content-Length`
//! only, within a deadline.
//!
//! Why not a crate: tiny_http (used before) starts a thread per connection before anything is
//! checked, and the well-kept bounded servers are async (tokio), which kiln does not use.
//! httparse (already in the tree through ureq) parses the head.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections accepted but without a complete head yet.
pub const MAX_PENDING: usize = 64;
/// From accept to a complete head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Complete requests waiting for a worker.
pub const QUEUE: usize = 32;
/// Time allowed to send a body once the handler reads it, and to take a response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unread body is drained before closing (closing with unread data sends a reset,
/// which can destroy the response before the client reads it).
const LINGER: Duration = Duration::from_millis(500);
/// Connections accepted per wake-up, so reading heads is never starved by a flood.
const ACCEPT_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request is {len} bytes: the limit is {limit}")]
    TooLarge { len: u64, limit: u64 },
    #[error("Transfer-Encoding is not supported: send a Content-Length")]
    Chunked,
    #[error("the Content-Length {0:?} is not a number")]
    BadLength(String),
    #[error("cannot read the request body: {0}")]
    Io(#[source] std::io::Error),
}

impl BodyError {
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge { .. } => 413,
            BodyError::Chunked => 501,
            BodyError::BadLength(_) | BodyError::Io(_) => 400,
        }
    }
}

/// One request whose head has arrived.
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    headers: Vec<(String, String)>,
    stream: TcpStream,
    /// Bytes that arrived after the head: the start of the body.
    early: Vec<u8>,
    /// Body bytes the client announced and nobody read yet.
    unread: u64,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Result<u64, BodyError> {
        if self.header("Transfer-Encoding").is_some() {
            return Err(BodyError::Chunked);
        }
        match self.header("Content-Length") {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| BodyError::BadLength(v.to_string())),
        }
    }

    /// The body, at most `limit` bytes, arriving within [`IO_TIMEOUT`].
    pub fn read_body(&mut self, limit: u64) -> Result<Vec<u8>, BodyError> {
        let len = self.content_length()?;
        if len > limit {
            return Err(BodyError::TooLarge { len, limit });
        }
        let mut body = std::mem::take(&mut self.early);
        body.truncate(len as usize);
        // curl waits (a second) for this before it sends a body of over 1 KiB.
        let expects = self
            .header("Expect")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        if expects && (body.len() as u64) < len {
            let _ = self.stream.set_write_timeout(Some(IO_TIMEOUT));
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(BodyError::Io)?;
        }
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut buf = [0u8; 16 << 10];
        while (body.len() as u64) < len {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BodyError::Io(ErrorKind::TimedOut.into()));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(BodyError::Io)?;
            let want = buf.len().min((len - body.len() as u64) as usize);
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => return Err(BodyError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(BodyError::Io(e)),
            }
        }
        self.unread = 0;
        Ok(body)
    }

    /// Sends a whole response and closes the connection.
    pub fn respond(mut self, status: u16, content_type: &str, body: &[u8]) {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
             Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n",
            reason(status),
            body.len()
        );
        let _ = self.stream.set_write_timeout(Some(IO_TIMEOUT));
        let sent = self
            .stream
            .write_all(head.as_bytes())
            .and_then(|()| self.stream.write_all(body))
            .and_then(|()| self.stream.flush());
        if let Err(e) = sent {
            tracing::debug!("response not delivered: {e}");
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        if self.unread > 0 {
            drain(&mut self.stream, self.unread);
        }
    }

    /// The connection, for a response written piece by piece (an event stream). Nothing has
    /// been written to it yet.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// Reads and drops up to `limit` bytes for at most [`LINGER`].
fn drain(s: &mut TcpStream, limit: u64) {
    let deadline = Instant::now() + LINGER;
    let mut left = limit;
    let mut buf = [0u8; 16 << 10];
    while left > 0 {
        let t = deadline.saturating_duration_since(Instant::now());
        if t.is_zero() || s.set_read_timeout(Some(t)).is_err() {
            return;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A bound listener.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        Ok(Server { listener, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves requests with `workers` threads calling `handler`, until the process ends.
    pub fn run(self, workers: usize, handler: Arc<dyn Fn(Request) + Send + Sync>) {
        let (tx, rx) = sync_channel::<Request>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let (rx, handler) = (rx.clone(), handler.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("serve-{i}"))
                .spawn(move || work(&rx, &*handler));
            if let Err(e) = spawned {
                tracing::warn!("cannot start a serve worker: {e}");
            }
        }
        accept_loop(&self.listener, &tx);
    }
}

fn work(rx: &Mutex<Receiver<Request>>, handler: &(dyn Fn(Request) + Send + Sync)) {
    loop {
        // The lock is held only while waiting: one idle worker waits, the rest queue on it.
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match next {
            Ok(req) => handler(req),
            Err(_) => return,
        }
    }
}

/// A connection whose head is still arriving.
struct Pending {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
    /// Refused and answered: what still arrives is read and dropped until the deadline, so
    /// closing does not reset the connection before the client has read the answer.
    closing: bool,
}

enum Progress {
    More,
    Closed,
    Done(Head, Vec<u8>),
    Refuse(u16, &'static str),
}

impl Pending {
    fn read(&mut self) -> Progress {
        let mut chunk = [0u8; 4096];
        if self.closing {
            loop {
                match self.stream.read(&mut chunk) {
                    Ok(0) => return Progress::Closed,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::More,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Progress::Closed,
                }
            }
        }
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Progress::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Progress::Closed,
            }
            if self.buf.len() > MAX_HEAD {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => {
                let head = Head {
                    method: req.method.unwrap_or("").to_string(),
                    target: req.path.unwrap_or("").to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                let early = self.buf.split_off(n);
                Progress::Done(head, early)
            }
            Ok(httparse::Status::Complete(_)) => {
                Progress::Refuse(431, "the request head is too large")
            }
            Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD => {
                Progress::Refuse(431, "the request head is too large")
            }
            Ok(httparse::Status::Partial) => Progress::More,
            Err(httparse::Error::TooManyHeaders) => {
                Progress::Refuse(431, "the request has too many headers")
            }
            Err(_) => Progress::Refuse(400, "the request is not valid HTTP/1.1"),
        }
    }

    /// Answers with an error and starts closing.
    fn refuse(&mut self, status: u16, message: &str) {
        refuse(&mut self.stream, status, message);
        self.closing = true;
        self.buf = Vec::new();
        self.deadline = Instant::now() + LINGER;
    }
}

struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn into_request(self, stream: TcpStream, early: Vec<u8>) -> Request {
        let mut r = Request {
            method: self.method,
            target: self.target,
            headers: self.headers,
            stream,
            early,
            unread: 0,
        };
        r.unread = r
            .content_length()
            .unwrap_or(0)
            .saturating_sub(r.early.len() as u64);
        r
    }
}

/// A short error on a connection no worker will serve; never blocks (the socket is
/// non-blocking: whatever does not fit is dropped).
fn refuse(stream: &mut TcpStream, status: u16, message: &str) {
    let body = serde_json::json!({ "error": message }).to_string();
    let text = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}

fn accept_loop(listener: &TcpListener, tx: &SyncSender<Request>) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    loop {
        let now = Instant::now();
        pending.retain_mut(|p| {
            if p.deadline > now {
                true
            } else if p.closing {
                false
            } else {
                p.refuse(408, "the request head did not arrive in time");
                true
            }
        });
        let wait = pending
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .fold(Duration::from_secs(1), Duration::min);
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(pending.iter().map(|p| p.stream.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs, borrowed mutably for
        // the whole call; every fd in it belongs to a socket alive until the call returns.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as libc::c_int,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                tracing::warn!("serve: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let mut kept = VecDeque::with_capacity(pending.len());
        for (mut p, fd) in pending.drain(..).zip(&fds[1..]) {
            if fd.revents == 0 {
                kept.push_back(p);
                continue;
            }
            match p.read() {
                Progress::More => kept.push_back(p),
                Progress::Closed => {}
                Progress::Refuse(status, message) => {
                    p.refuse(status, message);
                    kept.push_back(p);
                }
                Progress::Done(head, early) => dispatch(tx, head.into_request(p.stream, early)),
            }
        }
        pending = kept;
        if fds[0].revents != 0 {
            accept_some(listener, &mut pending);
        }
    }
}

fn accept_some(listener: &TcpListener, pending: &mut VecDeque<Pending>) {
    for _ in 0..ACCEPT_BATCH {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                if pending.len() >= MAX_PENDING {
                    // The oldest has had the longest to send its head: a real client sends
                    // it at once, so under a flood the idle ones go first.
                    pending.pop_front();
                }
                pending.push_back(Pending {
                    stream,
                    buf: Vec::new(),
                    deadline: Instant::now() + HEAD_TIMEOUT,
                    closing: false,
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors and the like: the connection stays in the backlog.
                tracing::warn!("serve: cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
        }
    }
}

/// Hands a complete request to the workers, or refuses it when they are all busy.
fn dispatch(tx: &SyncSender<Request>, req: Request) {
    if req.stream.set_nonblocking(false).is_err() {
        return;
    }
    match tx.try_send(req) {
        Ok(()) => {}
        Err(TrySendError::Full(mut req)) => {
            let _ = req.stream.set_nonblocking(true);
            refuse(&mut req.stream, 503, "the editor is busy: try again");
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}
