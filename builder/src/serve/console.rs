//! A build VM's console on the page: a WebSocket whose binary messages carry the VM's VNC
//! byte stream both ways, between noVNC in the page and QEMU's VNC socket. The route's
//! checks (Host, Origin, token) are the server's, made before this runs; the VNC password
//! still guards the screen, and the page gets it from the API, never in a URL.
//!
//! The WebSocket protocol (RFC 6455: framing, masking, fragments, ping, close) is
//! tungstenite's, on the blocking socket the server already accepted: the request head has
//! been read, so only the handshake's answer is written here.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{sync_channel, TryRecvError};
use std::time::Duration;

use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::http::Request;

/// Largest message or frame taken from the page: a VNC client sends key, pointer and update
/// requests of a few bytes (a clipboard paste is the largest).
const MAX_MESSAGE: usize = 256 << 10;
/// How long a read of the page's side waits before the VM's side is looked at again.
const POLL: Duration = Duration::from_millis(20);
/// Chunks of the VM's screen waiting to be sent; the reader waits while the page is slow.
const QUEUE: usize = 64;

/// Why a request cannot become a console WebSocket (an HTTP 400).
pub fn upgrade_error(req: &Request) -> Option<&'static str> {
    let has = |name: &str, token: &str| {
        req.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has("Upgrade", "websocket") || !has("Connection", "upgrade") {
        return Some("this is a WebSocket endpoint: send `Upgrade: websocket`");
    }
    if req.header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Some("only WebSocket version 13 is spoken");
    }
    match req.header("Sec-WebSocket-Key") {
        Some(k) if !k.trim().is_empty() => None,
        _ => Some("the request has no Sec-WebSocket-Key"),
    }
}

/// Answers the WebSocket handshake of `req` (checked by [`upgrade_error`]) and relays
/// between it and the VNC server at `socket` until either side closes. Runs on a thread of
/// its own.
pub fn proxy(req: Request, socket: &Path) {
    // Connected before answering, so a VM that is gone is an ordinary HTTP error.
    let vnc = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            let body = serde_json::json!({ "error": format!("the VM's console is gone: {e}") });
            return req.respond(409, "application/json", body.to_string().as_bytes());
        }
    };
    // noVNC asks for no subprotocol; older clients ask for `binary`, which this is.
    let Some(tcp) = accept(req, "binary") else {
        return;
    };
    if let Err(e) = relay(tcp, vnc) {
        tracing::debug!("console relay ended: {e}");
    }
}

/// Answers the WebSocket handshake of `req` (checked by [`upgrade_error`]), agreeing to
/// `protocol` when the page offers it; the socket, or None when the page went away.
pub fn accept(req: Request, protocol: &str) -> Option<TcpStream> {
    let key = req
        .header("Sec-WebSocket-Key")
        .unwrap_or("")
        .trim()
        .to_string();
    let offered = req
        .header("Sec-WebSocket-Protocol")
        .is_some_and(|v| v.split(',').any(|p| p.trim() == protocol));
    let mut tcp = req.into_stream();
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{}\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
        if offered {
            format!("Sec-WebSocket-Protocol: {protocol}\r\n")
        } else {
            String::new()
        }
    );
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
    tcp.write_all(head.as_bytes()).ok()?;
    Some(tcp)
}

/// The server's side of an accepted WebSocket: reads wait at most [`POLL`], so one thread
/// can serve both directions; messages from the page are at most `max` bytes.
pub fn server_socket(tcp: TcpStream, max: usize) -> std::io::Result<WebSocket<TcpStream>> {
    tcp.set_read_timeout(Some(POLL))?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    Ok(WebSocket::from_raw_socket(tcp, Role::Server, Some(config)))
}

fn relay(tcp: TcpStream, vnc: UnixStream) -> std::io::Result<()> {
    let mut ws = server_socket(tcp, MAX_MESSAGE)?;
    // The VM's side on a thread of its own: a blocking read, handed over in chunks.
    let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
    let mut from_vm = vnc.try_clone()?;
    let reader = std::thread::Builder::new()
        .name("serve-console".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from_vm.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        })?;
    let mut to_vm = vnc;
    let result = loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                if let Err(e) = to_vm.write_all(&b) {
                    break Err(e);
                }
            }
            Ok(Message::Close(_)) => break Ok(()),
            // Pings are answered by tungstenite on the next write; text is not VNC.
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                break Ok(())
            }
            Err(e) => break Err(std::io::Error::other(e.to_string())),
        }
        let mut vm_gone = false;
        loop {
            match rx.try_recv() {
                Ok(chunk) => {
                    if let Err(e) = ws.write(Message::Binary(chunk.into())) {
                        if !is_would_block(&e) {
                            vm_gone = true;
                            break;
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    vm_gone = true;
                    break;
                }
            }
        }
        if let Err(e) = ws.flush() {
            if !is_would_block(&e) {
                break Ok(());
            }
        }
        if vm_gone {
            let _ = ws.close(None);
            let _ = ws.flush();
            break Ok(());
        }
    };
    // Ends the reader's blocking read.
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    drop(rx);
    let _ = reader.join();
    result
}

pub fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}
