//! The Firecracker-style Unix-socket host side: the listening socket host programs connect
//! to, the `CONNECT <port>\n` handshake they send, and connecting to `<uds_path>_<port>` for
//! guest-initiated connections.

use std::io::{self, Read};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_HANDSHAKE_LINE: usize = 32;

/// Binds the host socket, replacing a stale socket file left by an earlier run (but never a
/// regular file or directory someone put there).
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The path a guest connection to host port `port` reaches: `<uds_path>_<port>`.
pub fn guest_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to a host listener without blocking: a listener whose backlog is full makes the
/// connect fail (the guest gets RST and may retry) instead of stalling the device thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long or invalid: {}", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (mem::size_of::<libc::sa_family_t>() + bytes.len()) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// What a host connection has sent of its handshake so far.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// More bytes are needed.
    Incomplete,
    /// `CONNECT <port>` was received.
    Connect(u32),
}

/// Why a handshake failed; the host stream is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("host closed the connection before the handshake")]
    Eof,
    #[error("handshake line longer than {MAX_HANDSHAKE_LINE} bytes")]
    TooLong,
    #[error("bad handshake line {0:?}: expected \"CONNECT <port>\"")]
    Malformed(String),
    #[error("reading the handshake: {0}")]
    Io(String),
}

/// A host connection that has not finished its `CONNECT <port>\n` line yet.
#[derive(Debug)]
pub struct Handshake {
    pub stream: UnixStream,
    pub deadline: Instant,
    line: Vec<u8>,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            deadline,
            line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
        }
    }

    /// Reads what is available of the handshake line. Reads one byte at a time so that data
    /// the host sent right after the line stays in the socket for the guest.
    pub fn advance(&mut self) -> Result<HandshakeStatus, HandshakeError> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) => {
                    if byte[0] == b'\n' {
                        return parse_connect(&self.line).map(HandshakeStatus::Connect);
                    }
                    if self.line.len() >= MAX_HANDSHAKE_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                    self.line.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(HandshakeStatus::Incomplete)
                }
                Err(e) => return Err(HandshakeError::Io(e.to_string())),
            }
        }
    }
}

/// Parses `CONNECT <port>` (a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ").ok_or_else(malformed)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    port.parse::<u32>().map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"connect 5",
            b"CONNECT -5",
            b"CONNECT +5",
            b"CONNECT 4294967296",
            b"CONNECT 5 6",
            b"\xff\xfe",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn handshake_leaves_following_bytes_in_the_socket() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        let mut h = Handshake::new(a, Instant::now() + Duration::from_secs(1));
        b.write_all(b"CONN").expect("w");
        assert_eq!(h.advance(), Ok(HandshakeStatus::Incomplete));
        b.write_all(b"ECT 77\npayload").expect("w");
        assert_eq!(h.advance(), Ok(HandshakeStatus::Connect(77)));
        let mut rest = [0u8; 7];
        h.stream.read_exact(&mut rest).expect("rest");
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn handshake_rejects_long_lines_and_eof() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        let mut h = Handshake::new(a, Instant::now());
        b.write_all(&[b'A'; 100]).expect("w");
        assert_eq!(h.advance(), Err(HandshakeError::TooLong));

        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        drop(b);
        let mut h = Handshake::new(a, Instant::now());
        assert_eq!(h.advance(), Err(HandshakeError::Eof));
    }

    #[test]
    fn guest_port_path_appends_port() {
        assert_eq!(
            guest_port_path(Path::new("/tmp/v.sock"), 52),
            PathBuf::from("/tmp/v.sock_52")
        );
    }

    #[test]
    fn nonblocking_connect_reports_missing_listener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = connect_nonblocking(&dir.path().join("nobody")).expect_err("no listener");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let path = dir.path().join("l");
        let _l = UnixListener::bind(&path).expect("bind");
        connect_nonblocking(&path).expect("connects");
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).expect_err("too long").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
