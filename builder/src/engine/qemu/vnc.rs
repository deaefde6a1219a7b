//! A VM's console: QEMU's VNC server on a Unix socket in the VM's work folder, behind a
//! one-time password that kiln makes for each VM start.
//!
//! The work folder sits in the per-user runtime folder (0700), so only this user reaches the
//! socket; the password is a second lock on it. VNC authentication is DES with at most 8
//! characters of password: weak against someone who can watch the connection, which on a
//! socket only this user can open nobody else can.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::path_io::PathIoError;

/// VNC authentication uses at most 8 characters of a password.
pub const PASSWORD_LEN: usize = 8;

/// Where a VM's VNC server listens.
pub fn vnc_socket(workdir: &Path) -> PathBuf {
    workdir.join("vnc.sock")
}

/// The VM's VNC password (0600), which QEMU reads through a `secret` object.
pub fn vnc_password_file(workdir: &Path) -> PathBuf {
    workdir.join("vnc.pass")
}

/// QEMU's arguments for a VNC server on [`vnc_socket`] with the password of
/// [`vnc_password_file`]. Commas in paths are doubled, as QEMU's option syntax wants.
pub fn vnc_args(workdir: &Path) -> [String; 4] {
    let escape = |p: PathBuf| p.to_string_lossy().replace(',', ",,");
    [
        "-object".into(),
        format!(
            "secret,id=vncsec0,file={}",
            escape(vnc_password_file(workdir))
        ),
        "-vnc".into(),
        format!(
            "unix:{},password-secret=vncsec0",
            escape(vnc_socket(workdir))
        ),
    ]
}

/// Makes a fresh password and writes it to [`vnc_password_file`] (0600, replacing an older
/// one), before QEMU starts and reads it. Letters and digits without look-alikes (l, I, O,
/// 0, 1): a person may have to type it into a viewer.
pub fn write_password(workdir: &Path) -> Result<String, PathIoError> {
    let password = random_password().map_err(|e| PathIoError::new("reading", "/dev/urandom", e))?;
    let path = vnc_password_file(workdir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PathIoError::new("removing", &path, e)),
    }
    // create_new: the file is made 0600 here, never an older file with other modes reused.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(PathIoError::at("creating", &path))?;
    f.write_all(password.as_bytes())
        .map_err(PathIoError::at("writing", &path))?;
    Ok(password)
}

/// [`PASSWORD_LEN`] letters and digits from the kernel's random source.
fn random_password() -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    // Bytes past the last whole multiple of the alphabet's size are dropped, so every
    // character is equally likely.
    let limit = 256 - 256 % ALPHABET.len();
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut buf = [0u8; 32];
    while out.len() < PASSWORD_LEN {
        urandom.read_exact(&mut buf)?;
        for &b in &buf {
            if (b as usize) < limit && out.len() < PASSWORD_LEN {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_start_gets_a_fresh_private_password() {
        let t = tempfile::tempdir().unwrap();
        let a = write_password(t.path()).unwrap();
        let file = vnc_password_file(t.path());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), a);
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()), "{a}");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A file left with other modes is replaced, not reused.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let b = write_password(t.path()).unwrap();
        assert_ne!(a, b, "two starts, one password");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn args_name_the_socket_and_the_secret() {
        assert_eq!(
            vnc_args(Path::new("/r/a,b")),
            [
                "-object",
                "secret,id=vncsec0,file=/r/a,,b/vnc.pass",
                "-vnc",
                "unix:/r/a,,b/vnc.sock,password-secret=vncsec0",
            ]
        );
    }
}
