//! Files over SFTP: a write goes to a temporary name in the destination's folder and is
//! renamed over it (so a reader never sees half a file), and a read is bounded.

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};

/// What one write or read request carries: OpenSSH's sftp-server takes up to 256 KiB.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("SFTP: {what} {path}: {source}")]
    Sftp {
        what: &'static str,
        path: String,
        source: SftpError,
    },
    #[error("SFTP: {path} is larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
}

fn at<'a>(what: &'static str, path: &'a str) -> impl FnOnce(SftpError) -> FileError + 'a {
    move |source| FileError::Sftp {
        what,
        path: path.to_string(),
        source,
    }
}

fn is_status(e: &SftpError, code: StatusCode) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == code)
}

/// Creates the folders above `path` that are missing, like `mkdir -p`.
async fn create_parents(s: &RawSftpSession, path: &str) -> Result<(), FileError> {
    let mut dir = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if part.is_empty() {
            continue;
        }
        dir.push('/');
        dir.push_str(part);
        if s.stat(dir.as_str()).await.is_ok() {
            continue;
        }
        if let Err(e) = s.mkdir(dir.as_str(), FileAttributes::default()).await {
            // Made meanwhile by someone else is as good.
            if s.stat(dir.as_str()).await.is_err() {
                return Err(at("creating the folder", &dir)(e));
            }
        }
    }
    Ok(())
}

/// The SSH wire form of a string (length, then bytes), for an extended request's data.
fn ssh_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Renames `from` over `to`: OpenSSH's POSIX rename replaces `to` atomically; the plain SFTP
/// rename of other servers fails when `to` exists, so it is removed first there.
async fn rename_over(s: &RawSftpSession, from: &str, to: &str) -> Result<(), FileError> {
    let mut data = Vec::new();
    ssh_string(&mut data, from);
    ssh_string(&mut data, to);
    if let Ok(Packet::Status(st)) = s.extended("posix-rename@openssh.com", data).await {
        if st.status_code == StatusCode::Ok {
            return Ok(());
        }
    }
    if s.rename(from, to).await.is_ok() {
        return Ok(());
    }
    let _ = s.remove(to).await;
    s.rename(from, to).await.map_err(at("renaming onto", to))?;
    Ok(())
}

/// Writes `data` to `path` with `mode`, as the SSH user: parents created, written to a
/// temporary name beside it, then renamed over it.
pub async fn put(
    s: &RawSftpSession,
    path: &str,
    data: &[u8],
    mode: u32,
    n: u64,
) -> Result<(), FileError> {
    create_parents(s, path).await?;
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let tmp = format!("{dir}/.{name}.kiln-{n}");
    let attrs = FileAttributes {
        permissions: Some(mode & 0o7777),
        ..FileAttributes::default()
    };
    let h = s
        .open(
            tmp.as_str(),
            OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
            attrs.clone(),
        )
        .await
        .map_err(at("creating", &tmp))?
        .handle;
    let written = async {
        for (i, c) in data.chunks(CHUNK).enumerate() {
            s.write(h.as_str(), (i * CHUNK) as u64, c.to_vec())
                .await
                .map_err(at("writing", &tmp))?;
        }
        // The umask applied at open: set the mode asked for.
        s.fsetstat(h.as_str(), attrs)
            .await
            .map_err(at("setting the mode of", &tmp))?;
        Ok::<(), FileError>(())
    }
    .await;
    let closed = s.close(h.as_str()).await.map_err(at("closing", &tmp));
    let done = match (written, closed) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => rename_over(s, &tmp, path).await,
    };
    if done.is_err() {
        let _ = s.remove(tmp.as_str()).await;
    }
    done
}

/// Reads `path` whole with its permission bits; None when it does not exist; an error when
/// it holds more than `max` bytes.
pub async fn read(
    s: &RawSftpSession,
    path: &str,
    max: u64,
) -> Result<Option<(Vec<u8>, u32)>, FileError> {
    let h = match s
        .open(path, OpenFlags::READ, FileAttributes::default())
        .await
    {
        Ok(h) => h.handle,
        Err(e) if is_status(&e, StatusCode::NoSuchFile) => return Ok(None),
        Err(e) => return Err(at("opening", path)(e)),
    };
    let r = async {
        let attrs = s
            .fstat(h.as_str())
            .await
            .map_err(at("reading the mode of", path))?
            .attrs;
        if attrs.size.is_some_and(|n| n > max) {
            return Err(FileError::TooLarge {
                path: path.into(),
                max,
            });
        }
        let mut out = Vec::new();
        loop {
            match s.read(h.as_str(), out.len() as u64, CHUNK as u32).await {
                Ok(d) if d.data.is_empty() => break,
                Ok(d) => {
                    // The size may have grown since the stat: the bound is on what is read.
                    if out.len() as u64 + d.data.len() as u64 > max {
                        return Err(FileError::TooLarge {
                            path: path.into(),
                            max,
                        });
                    }
                    out.extend_from_slice(&d.data);
                }
                Err(e) if is_status(&e, StatusCode::Eof) => break,
                Err(e) => return Err(at("reading", path)(e)),
            }
        }
        Ok((out, attrs.permissions.unwrap_or(0) & 0o7777))
    }
    .await;
    let _ = s.close(h.as_str()).await;
    r.map(Some)
}

/// Removes a file, best effort (a script kiln uploaded to run once).
pub async fn remove(s: &RawSftpSession, path: &str) {
    let _ = s.remove(path).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_strings_are_length_prefixed() {
        let mut v = Vec::new();
        ssh_string(&mut v, "ab");
        ssh_string(&mut v, "");
        assert_eq!(v, [0, 0, 0, 2, b'a', b'b', 0, 0, 0, 0]);
    }
}
