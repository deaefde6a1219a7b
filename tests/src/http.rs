//! A loopback HTTP/1.1 server for tests in which kiln or a guest downloads something.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What every request gets, at any path.
enum Reply {
    Bytes(Arc<[u8]>),
    /// Opened per request, so a test can change or remove it between downloads.
    File(PathBuf),
}

/// A server on 127.0.0.1 that answers every request with the same reply and closes the
/// connection; it lives until the test process ends.
pub struct Server {
    pub port: u16,
    hits: Arc<AtomicUsize>,
}

impl Server {
    /// Serves `body`.
    pub fn bytes(body: impl Into<Vec<u8>>) -> Server {
        Server::start(Reply::Bytes(body.into().into()))
    }

    /// Serves the file at `path` (404 Not Found while it is missing).
    pub fn file(path: PathBuf) -> Server {
        Server::start(Reply::File(path))
    }

    /// How many connections it has accepted.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn start(reply: Reply) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = l.local_addr().expect("local addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let reply = Arc::new(reply);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = reply.clone();
                // One thread per connection: a slow reader must not hold up the next one.
                std::thread::spawn(move || answer(s, &reply));
            }
        });
        Server { port, hits }
    }
}

fn answer(mut s: TcpStream, reply: &Reply) {
    // Read the request head up to its blank line; the path does not matter.
    let Ok(head) = s.try_clone() else { return };
    let mut r = BufReader::new(head);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
        line.clear();
    }
    let ok = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
    };
    match reply {
        Reply::Bytes(body) => {
            let _ = s.write_all(ok(body.len()).as_bytes());
            let _ = s.write_all(body);
        }
        Reply::File(path) => {
            let Ok(mut f) = std::fs::File::open(path) else {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                return;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = s.write_all(ok(len as usize).as_bytes());
            let _ = std::io::copy(&mut f, &mut s);
        }
    }
}
