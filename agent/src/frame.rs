//! Framing: every message is one frame, a fixed 8-byte header followed by a body.
//!
//! ```text
//! offset 0  u32 little-endian  body length (at most MAX_PAYLOAD)
//! offset 4  u8                 frame type (see `message::FrameType`)
//! offset 5  3 bytes            reserved, must be zero (room for flags in later versions)
//! ```
//!
//! The length is checked against [`MAX_PAYLOAD`] before anything is allocated, so a hostile
//! peer can make a reader hold at most one frame's worth of memory.

use std::io::{self, Read, Write};

use crate::message::Message;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Largest body a frame may carry. Data chunks are well below it; the rest is room for a
/// script or a long argv.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Size of the data chunks (stdout, stderr, stdin, file data) either side sends.
pub const DATA_CHUNK: usize = 256 * 1024;

/// Why a frame could not be read or decoded. Every variant ends the session.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error on the agent stream: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("stream truncated inside a frame {part}: got {got} of {want} bytes")]
    Truncated {
        part: &'static str,
        got: usize,
        want: usize,
    },
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("reserved frame header bytes are not zero: {0:02x?}")]
    BadReserved([u8; 3]),
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

/// Parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub ty: u8,
}

impl Header {
    /// Validate a raw header: length cap and reserved bytes. The type is checked when the
    /// body is decoded (so the error can name it).
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        let reserved = [raw[5], raw[6], raw[7]];
        if reserved != [0, 0, 0] {
            return Err(FrameError::BadReserved(reserved));
        }
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(Header { len, ty: raw[4] })
    }

    pub fn encode(len: usize, ty: u8) -> [u8; HEADER_LEN] {
        let l = (len as u32).to_le_bytes();
        [l[0], l[1], l[2], l[3], ty, 0, 0, 0]
    }
}

/// Reads frames from a stream, reusing one body buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Read one raw frame: its type and body. `Closed` only at a frame boundary.
    pub fn read_raw(&mut self) -> Result<(u8, &[u8]), FrameError> {
        let mut raw = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut raw)?;
        if got == 0 {
            return Err(FrameError::Closed);
        }
        if got < HEADER_LEN {
            return Err(FrameError::Truncated {
                part: "header",
                got,
                want: HEADER_LEN,
            });
        }
        let h = Header::parse(&raw)?;
        self.buf.resize(h.len, 0);
        let got = read_full(&mut self.inner, &mut self.buf)?;
        if got < h.len {
            return Err(FrameError::Truncated {
                part: "body",
                got,
                want: h.len,
            });
        }
        Ok((h.ty, &self.buf))
    }

    /// Read and decode one message.
    pub fn read(&mut self) -> Result<Message, FrameError> {
        let (ty, body) = self.read_raw()?;
        Message::decode(ty, body)
    }
}

/// Read until `buf` is full or EOF; returns the bytes read. Retries EINTR.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes frames, each with a single `write_all` of header and body.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(HEADER_LEN + DATA_CHUNK + 64),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Encode and send one message.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        let ty = msg.encode_body(&mut self.buf);
        self.finish(ty)
    }

    /// Send a data-carrying frame (stdout, stderr, stdin, file data) without building a
    /// `Message`: the body is the raw bytes.
    pub fn send_data(&mut self, ty: u8, data: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        self.buf.extend_from_slice(data);
        self.finish(ty)
    }

    /// Send a data frame whose body `fill` reads straight into the frame buffer (no extra
    /// copy). `fill` returns how many bytes it wrote into the slice it is given; 0 sends
    /// nothing and returns Ok(0).
    pub fn send_data_with<F>(&mut self, ty: u8, max: usize, fill: F) -> io::Result<usize>
    where
        F: FnOnce(&mut [u8]) -> io::Result<usize>,
    {
        let max = max.min(MAX_PAYLOAD);
        self.buf.clear();
        self.buf.resize(HEADER_LEN + max, 0);
        let n = fill(&mut self.buf[HEADER_LEN..])?.min(max);
        if n == 0 {
            return Ok(0);
        }
        self.buf.truncate(HEADER_LEN + n);
        self.finish(ty)?;
        Ok(n)
    }

    fn finish(&mut self, ty: u8) -> io::Result<()> {
        let len = self.buf.len() - HEADER_LEN;
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("message body of {len} bytes exceeds the frame limit of {MAX_PAYLOAD}"),
            ));
        }
        self.buf[..HEADER_LEN].copy_from_slice(&Header::encode(len, ty));
        self.inner.write_all(&self.buf)?;
        self.inner.flush()
    }
}
