//! The `httpDirectory` server: files served over HTTP to the build's VMs, reachable from
//! guests at their gateway's address (`{{ .HTTPIP }}`) and a chosen port (`{{ .HTTPPort }}`).
//!
//! The server listens on the host's loopback only; the gateway's NAT carries guest
//! connections to it. It serves plain file names from one directory, GET and HEAD only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const MAX_CONNECTIONS: usize = 32;

pub struct HttpDir {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpDir {
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let dir = dir.to_path_buf();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-http-dir".into())
            .spawn(move || serve(listener, dir, s))?;
        Ok(HttpDir {
            addr,
            stop,
            thread: Some(thread),
        })
    }
    /// The loopback address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpDir {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, dir: PathBuf, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(conn) = conn else { continue };
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (dir, active) = (dir.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-http-conn".into())
            .spawn(move || {
                if let Err(e) = answer(conn, &dir) {
                    tracing::debug!("httpDirectory: {e}");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("httpDirectory: cannot start a connection thread");
        }
    }
}

fn answer(conn: TcpStream, dir: &Path) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(16 * 1024));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Skip the headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = conn;
    if method != "GET" && method != "HEAD" {
        return respond(&mut out, "405 Method Not Allowed", b"", true);
    }
    let name = path.trim_start_matches('/');
    let name = name.split('?').next().unwrap_or("");
    let valid = !name.is_empty() && !name.contains('/') && name != ".." && name != ".";
    let body = if valid {
        std::fs::read(dir.join(name)).ok()
    } else {
        None
    };
    match body {
        Some(b) => respond(&mut out, "200 OK", &b, method == "GET"),
        None => respond(&mut out, "404 Not Found", b"not found\n", method == "GET"),
    }
}

fn respond(out: &mut TcpStream, status: &str, body: &[u8], with_body: bool) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if with_body {
        out.write_all(body)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    #[test]
    fn serves_files_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ks.cfg"), "hello").unwrap();
        let h = HttpDir::start(d.path()).unwrap();
        let r = get(h.addr(), "/ks.cfg");
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        assert!(r.ends_with("hello"));
        assert!(get(h.addr(), "/../etc/passwd").starts_with("HTTP/1.0 404"));
        assert!(get(h.addr(), "/missing").starts_with("HTTP/1.0 404"));
    }
}
