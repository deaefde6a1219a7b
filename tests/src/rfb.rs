//! A VNC (RFB 3.8, RFC 6143) client only as far as tests need: the version banner, the
//! security types offered, VNC authentication (the DES challenge) and the framebuffer size
//! in ServerInit.

use std::io::{Read, Write};

use des::cipher::{BlockCipherEncrypt, KeyInit};

use crate::{KitError, Result};

/// What the server said during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The server's banner, e.g. `RFB 003.008`.
    pub version: String,
    /// The security types offered (2 is VNC authentication).
    pub security_types: Vec<u8>,
    /// ServerInit once authenticated, else the server's reason for refusing.
    pub result: std::result::Result<ServerInit, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub name: String,
}

/// Security type "VNC authentication".
pub const VNC_AUTH: u8 = 2;

/// Runs the handshake on `s` with VNC authentication and `password`, up to ServerInit.
pub fn handshake(s: &mut (impl Read + Write), password: &str) -> Result<Handshake> {
    let io = |what: &str| KitError::io(format!("RFB {what}"));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).map_err(io("banner"))?;
    let version = String::from_utf8_lossy(&banner).trim_end().to_string();
    if !version.starts_with("RFB ") {
        return Err(KitError::Other(format!("not an RFB server: {version:?}")));
    }
    s.write_all(b"RFB 003.008\n").map_err(io("version"))?;
    let n = read_u8(s)?;
    if n == 0 {
        let reason = read_string(s)?;
        return Err(KitError::Other(format!(
            "the server offers no security type: {reason}"
        )));
    }
    let mut security_types = vec![0u8; n as usize];
    s.read_exact(&mut security_types)
        .map_err(io("security types"))?;
    if !security_types.contains(&VNC_AUTH) {
        return Err(KitError::Other(format!(
            "the server does not offer VNC authentication: {security_types:?}"
        )));
    }
    s.write_all(&[VNC_AUTH]).map_err(io("security type"))?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge).map_err(io("challenge"))?;
    s.write_all(&vnc_auth_response(password, challenge))
        .map_err(io("response"))?;
    let mut status = [0u8; 4];
    s.read_exact(&mut status).map_err(io("security result"))?;
    if u32::from_be_bytes(status) != 0 {
        let reason = read_string(s).unwrap_or_default();
        return Ok(Handshake {
            version,
            security_types,
            result: Err(reason),
        });
    }
    // ClientInit: share the desktop with other viewers.
    s.write_all(&[1]).map_err(io("ClientInit"))?;
    let mut init = [0u8; 20];
    s.read_exact(&mut init).map_err(io("ServerInit"))?;
    let name = read_string(s)?;
    Ok(Handshake {
        version,
        security_types,
        result: Ok(ServerInit {
            width: u16::from_be_bytes([init[0], init[1]]),
            height: u16::from_be_bytes([init[2], init[3]]),
            name,
        }),
    })
}

/// VNC authentication's answer: the challenge encrypted with DES, the key being the
/// password's first 8 bytes (zero-padded) with each byte's bits reversed.
pub fn vnc_auth_response(password: &str, challenge: [u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = challenge;
    for half in out.chunks_exact_mut(8) {
        let mut block: [u8; 8] = half.try_into().unwrap_or_default();
        let b = (&mut block).into();
        cipher.encrypt_block(b);
        half.copy_from_slice(&block);
    }
    out
}

fn read_u8(s: &mut impl Read) -> Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(KitError::io("RFB read"))?;
    Ok(b[0])
}

/// A u32 length and that many bytes, bounded.
fn read_string(s: &mut impl Read) -> Result<String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(KitError::io("RFB read"))?;
    let len = u32::from_be_bytes(len).min(1 << 16) as usize;
    let mut text = vec![0u8; len];
    s.read_exact(&mut text).map_err(KitError::io("RFB read"))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn des_answers_match_a_known_vnc_exchange() {
        // DES with key 0 (password "") of the zero block is 8CA64DE9C1B123A7 (the standard
        // all-zeros test vector), which bit reversal of zero bytes keeps.
        let r = vnc_auth_response("", [0; 16]);
        assert_eq!(r[..8], [0x8c, 0xa6, 0x4d, 0xe9, 0xc1, 0xb1, 0x23, 0xa7]);
        assert_eq!(r[..8], r[8..]);
        // Only the first 8 characters count.
        let c: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            vnc_auth_response("abcdefgh", c),
            vnc_auth_response("abcdefghXYZ", c)
        );
        assert_ne!(
            vnc_auth_response("abcdefgh", c),
            vnc_auth_response("abcdefgi", c)
        );
    }
}
