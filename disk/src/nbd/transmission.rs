//! The transmission phase: requests in, simple replies out, one request at a time.
//!
//! Every field of a request comes from the client, and behind QEMU from the guest: offsets
//! and lengths are checked against the device before any call, and no request gets a buffer
//! larger than the export's maximum block size.

use std::io::{self, Read, Write};

use super::client_error::ClientError;
use super::wire::*;
use crate::device::{check_range, BlockDevice, BlockError};

/// Serve requests until the client disconnects (NBD_CMD_DISC or end of stream) or breaks
/// the protocol. `max_len` bounds READ and WRITE payloads.
pub fn serve(
    r: &mut impl Read,
    w: &mut impl Write,
    dev: &dyn BlockDevice,
    max_len: u32,
) -> Result<(), ClientError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut head = [0u8; REQUEST_LEN];
        if !read_full_or_eof(r, &mut head)? {
            tracing::debug!("NBD client closed the connection");
            return Ok(());
        }
        let Some(req) = Request::parse(&head) else {
            return Err(ClientError::RequestMagic(be32(&head[0..4])));
        };
        match req.kind {
            CMD_DISC => {
                tracing::debug!("NBD client disconnected");
                return Ok(());
            }
            CMD_READ => {
                let len = req.len as usize;
                let error = if req.len > max_len {
                    EINVAL
                } else if let Err(e) =
                    check_flags(req, 0).and_then(|()| check_in_range(dev, req, EINVAL))
                {
                    e
                } else {
                    grow(&mut buf, len);
                    match unless_empty(req, || dev.read_at(&mut buf[..len], req.offset)) {
                        Ok(()) => {
                            write_simple_reply(w, 0, req.handle, &buf[..len])?;
                            continue;
                        }
                        Err(e) => e,
                    }
                };
                reply_error(w, req, error)?;
            }
            CMD_WRITE => {
                if req.len > max_len {
                    // Its payload follows, and reading it only to throw it away is what a
                    // hostile client would want: answer, then close.
                    let _ = write_simple_reply(w, EINVAL, req.handle, &[]);
                    return Err(ClientError::WriteTooBig {
                        len: req.len,
                        max: max_len,
                    });
                }
                let len = req.len as usize;
                grow(&mut buf, len);
                // The payload is read even when the request is refused, so the next header
                // is where the client put it.
                r.read_exact(&mut buf[..len])?;
                let result = check_flags(req, CMD_FLAG_FUA)
                    .and_then(|()| check_writable(dev))
                    .and_then(|()| check_in_range(dev, req, ENOSPC))
                    .and_then(|()| unless_empty(req, || dev.write_at(&buf[..len], req.offset)))
                    .and_then(|()| flush_if_fua(dev, req));
                finish(w, req, result)?;
            }
            CMD_FLUSH => {
                let result = check_flags(req, CMD_FLAG_FUA).and_then(|()| run(req, dev.flush()));
                finish(w, req, result)?;
            }
            CMD_TRIM => {
                let result = check_flags(req, CMD_FLAG_FUA)
                    .and_then(|()| check_writable(dev))
                    .and_then(|()| check_in_range(dev, req, EINVAL))
                    .and_then(|()| {
                        unless_empty(req, || match dev.discard(req.offset, req.len.into()) {
                            // Trim is a hint: a device that cannot drop data has done enough.
                            Err(BlockError::Unsupported(_)) => Ok(()),
                            other => other,
                        })
                    })
                    .and_then(|()| flush_if_fua(dev, req));
                finish(w, req, result)?;
            }
            CMD_WRITE_ZEROES => {
                let result = check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
                    .and_then(|()| check_writable(dev))
                    .and_then(|()| check_in_range(dev, req, ENOSPC))
                    .and_then(|()| {
                        unless_empty(req, || dev.write_zeroes(req.offset, req.len.into()))
                    })
                    .and_then(|()| flush_if_fua(dev, req));
                finish(w, req, result)?;
            }
            // NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS (needs structured replies), resize and
            // anything newer were never advertised.
            _ => reply_error(w, req, EINVAL)?,
        }
    }
}

/// Make `buf` at least `len` bytes; it never grows past the largest request served, which
/// is at most the export's maximum block size.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// FUA may come with any command; NO_HOLE only with WRITE_ZEROES (`allowed`). Anything else
/// was never negotiated.
fn check_flags(req: Request, allowed: u16) -> Result<(), u32> {
    if req.flags & !(allowed | CMD_FLAG_FUA) != 0 {
        tracing::debug!(
            flags = req.flags,
            kind = req.kind,
            "NBD request with unknown flags"
        );
        return Err(EINVAL);
    }
    Ok(())
}

fn check_writable(dev: &dyn BlockDevice) -> Result<(), u32> {
    if dev.read_only() {
        return Err(EPERM);
    }
    Ok(())
}

/// Refuse a range past the end with `error` (ENOSPC for writes, EINVAL otherwise, as the
/// protocol suggests).
fn check_in_range(dev: &dyn BlockDevice, req: Request, error: u32) -> Result<(), u32> {
    check_range(dev.size(), req.offset, req.len.into()).map_err(|_| {
        tracing::debug!(
            offset = req.offset,
            len = req.len,
            size = dev.size(),
            "NBD request past the end of the export"
        );
        error
    })
}

fn flush_if_fua(dev: &dyn BlockDevice, req: Request) -> Result<(), u32> {
    if req.flags & CMD_FLAG_FUA != 0 {
        return run(req, dev.flush());
    }
    Ok(())
}

fn run(req: Request, result: Result<(), BlockError>) -> Result<(), u32> {
    result.map_err(|e| errno_of(&e, req))
}

/// Run a data command on the device, unless it has length 0: the protocol allows those and
/// they do nothing, and not every device takes an empty range.
fn unless_empty(req: Request, op: impl FnOnce() -> Result<(), BlockError>) -> Result<(), u32> {
    if req.len == 0 {
        return Ok(());
    }
    run(req, op())
}

/// The protocol's error value for a device error.
fn errno_of(e: &BlockError, req: Request) -> u32 {
    tracing::warn!(
        kind = req.kind,
        offset = req.offset,
        len = req.len,
        "NBD request failed: {e}"
    );
    match e {
        BlockError::ReadOnly => EPERM,
        BlockError::OutOfRange { .. } if req.kind == CMD_READ => EINVAL,
        BlockError::OutOfRange { .. } => ENOSPC,
        BlockError::Unsupported(_) => ENOTSUP,
        BlockError::Io(io) => match io.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            _ => EIO,
        },
        BlockError::Corrupt(_) => EIO,
    }
}

fn finish(w: &mut impl Write, req: Request, result: Result<(), u32>) -> io::Result<()> {
    match result {
        Ok(()) => write_simple_reply(w, 0, req.handle, &[]),
        Err(error) => reply_error(w, req, error),
    }
}

fn reply_error(w: &mut impl Write, req: Request, error: u32) -> io::Result<()> {
    write_simple_reply(w, error, req.handle, &[])
}
