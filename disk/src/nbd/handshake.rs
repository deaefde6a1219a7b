//! The fixed newstyle handshake: greeting, client flags, then options until the client picks
//! the export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.

use std::io::{Read, Write};

use super::client_error::ClientError;
use super::wire::*;

/// What the server offers, fixed for one connection.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl Export {
    /// The export's name as the client sent it: the configured one, or "" for the default.
    fn is_named(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// How the handshake ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Go on to the transmission phase.
    Transmission,
    /// The client sent NBD_OPT_ABORT or closed the connection between options.
    Left,
}

/// Run the handshake on one connection.
pub fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    export: &Export,
) -> Result<Outcome, ClientError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let mut b4 = [0u8; 4];
    if !read_full_or_eof(r, &mut b4)? {
        return Ok(Outcome::Left);
    }
    let client_flags = be32(&b4);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ClientError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut head = [0u8; 16];
        if !read_full_or_eof(r, &mut head)? {
            return Ok(Outcome::Left);
        }
        let magic = be64(&head[0..8]);
        if magic != IHAVEOPT {
            return Err(ClientError::OptionMagic(magic));
        }
        let opt = be32(&head[8..12]);
        let len = be32(&head[12..16]);
        if len > MAX_OPTION_LEN {
            // Skipping it would mean reading up to 4 GiB from a client that is either
            // broken or hostile: say why, then close.
            let _ = write_option_reply(w, opt, REP_ERR_TOO_BIG, b"option data too long");
            return Err(ClientError::OptionTooBig { opt, len });
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;

        match opt {
            OPT_EXPORT_NAME => {
                // This option cannot be answered with an error: an unknown name ends the
                // session, as the protocol requires.
                if !export.is_named(&data) {
                    return Err(ClientError::UnknownExport(lossy(&data)));
                }
                let mut msg = Vec::with_capacity(134);
                msg.extend_from_slice(&export.size.to_be_bytes());
                msg.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    msg.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&msg)?;
                w.flush()?;
                return Ok(Outcome::Transmission);
            }
            OPT_ABORT => {
                // The client may already have closed its side; the reply is a courtesy.
                let _ = write_option_reply(w, opt, REP_ACK, &[]);
                return Ok(Outcome::Left);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    write_option_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut server = Vec::with_capacity(4 + export.name.len());
                server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                server.extend_from_slice(export.name.as_bytes());
                write_option_reply(w, opt, REP_SERVER, &server)?;
                write_option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                if answer_info(w, opt, &data, export)? && opt == OPT_GO {
                    return Ok(Outcome::Transmission);
                }
            }
            // Structured replies, TLS, metadata contexts and anything newer: refused, so
            // the client falls back to simple replies.
            _ => write_option_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Answer NBD_OPT_INFO or NBD_OPT_GO; `true` when the export was described and acknowledged.
fn answer_info(
    w: &mut impl Write,
    opt: u32,
    data: &[u8],
    export: &Export,
) -> Result<bool, ClientError> {
    // Data: u32 name length, name, u16 count, count u16 information requests.
    let Some(parsed) = parse_info_request(data) else {
        write_option_reply(w, opt, REP_ERR_INVALID, b"malformed information request")?;
        return Ok(false);
    };
    let (name, requests) = parsed;
    if !export.is_named(name) {
        tracing::debug!(name = %lossy(name), "NBD client asked for an unknown export");
        write_option_reply(w, opt, REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(false);
    }
    let wants_block_size = requests.contains(&INFO_BLOCK_SIZE);
    // Without NBD_INFO_BLOCK_SIZE a client may send 1-byte aligned requests; a device
    // that needs more must make it ask.
    if opt == OPT_GO && export.min_block > 1 && !wants_block_size {
        write_option_reply(
            w,
            opt,
            REP_ERR_BLOCK_SIZE_REQD,
            b"request NBD_INFO_BLOCK_SIZE",
        )?;
        return Ok(false);
    }

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&export.flags.to_be_bytes());
    write_option_reply(w, opt, REP_INFO, &info)?;
    if wants_block_size {
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&export.min_block.to_be_bytes());
        info.extend_from_slice(&export.preferred_block.to_be_bytes());
        info.extend_from_slice(&export.max_block.to_be_bytes());
        write_option_reply(w, opt, REP_INFO, &info)?;
    }
    write_option_reply(w, opt, REP_ACK, &[])?;
    Ok(true)
}

/// Split NBD_OPT_INFO/GO data into the name and the requested information types; `None` when
/// the lengths inside do not add up to the option length.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize::try_from(be32(data.get(0..4)?)).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count = data.get(name_end..name_end + 2)?;
    let count = usize::from(u16::from_be_bytes([count[0], count[1]]));
    let list = data.get(name_end + 2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
