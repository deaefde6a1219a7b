//! Positional vectored I/O on a file (`preadv` / `pwritev`), and views of part of a
//! scatter list: what the devices' `read_vectored_at` / `write_vectored_at` are built from.
//!
//! The buffers may be a guest's pages (kiln-vmm's virtio-blk hands them over in place), which
//! the guest can change while a syscall runs. Everything here only passes them to the kernel
//! or stores into them; nothing reads them back and acts on what it found.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::AsRawFd;

/// Most iovecs one `preadv`/`pwritev` takes (Linux `UIO_MAXIOV`); longer lists go in turns.
const IOV_MAX: usize = 1024;

/// Fill `bufs` from `offset` of `file`, one `preadv` per 1024 buffers unless the kernel
/// returns short. End of file before the buffers are full is an error (`UnexpectedEof`),
/// as for `read_exact_at`.
pub(crate) fn preadv_exact(
    file: &File,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let n = preadv(file, bufs, offset)?;
    if n == total {
        return Ok(());
    }
    // Short read (a signal, a list past IOV_MAX, end of file): go on with the rest through
    // reborrowed slices, so the caller's list is left as it was.
    let mut rest: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut rest = &mut rest[..];
    IoSliceMut::advance_slices(&mut rest, n);
    let mut pos = offset + n as u64;
    while !rest.is_empty() {
        let n = preadv(file, rest, pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of file at {pos:#x} before the read was complete"),
            ));
        }
        IoSliceMut::advance_slices(&mut rest, n);
        pos += n as u64;
    }
    Ok(())
}

/// Write all of `bufs` at `offset` of `file`, one `pwritev` unless the kernel takes less.
pub(crate) fn pwritev_all(file: &File, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let n = pwritev(file, bufs, offset)?;
    if n == total {
        return Ok(());
    }
    let mut rest: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut rest[..];
    IoSlice::advance_slices(&mut rest, n);
    let mut pos = offset + n as u64;
    while !rest.is_empty() {
        let n = pwritev(file, rest, pos)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
        pos += n as u64;
    }
    Ok(())
}

/// One `preadv`, retried on EINTR; returns the bytes read.
fn preadv(file: &File, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
    let cnt = bufs.len().min(IOV_MAX) as libc::c_int;
    retry_eintr(|| {
        // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` on Unix (std guarantees
        // it); the first `cnt` entries are valid, writable buffers borrowed for this call, and
        // the kernel writes at most their lengths.
        unsafe {
            libc::preadv(
                file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                cnt,
                off,
            )
        }
    })
}

/// One `pwritev`, retried on EINTR; returns the bytes written.
fn pwritev(file: &File, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
    let cnt = bufs.len().min(IOV_MAX) as libc::c_int;
    retry_eintr(|| {
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix; the first `cnt`
        // entries are valid buffers borrowed for this call, which the kernel only reads.
        unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                cnt,
                off,
            )
        }
    })
}

/// Run a syscall until it is not interrupted; its non-negative result as a count.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The bytes `start..start + len` of the stream formed by `bufs`, as a list of reborrowed
/// pieces (fewer than `len` bytes if the stream ends first).
pub(crate) fn sub_slices_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    mut start: usize,
    len: usize,
) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let mut left = len;
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        if start >= b.len() {
            start -= b.len();
            continue;
        }
        let n = (b.len() - start).min(left);
        out.push(IoSliceMut::new(&mut b[start..start + n]));
        left -= n;
        start = 0;
    }
    out
}

/// Store zeroes into every buffer.
pub(crate) fn fill_zero(bufs: &mut [IoSliceMut<'_>]) {
    for b in bufs.iter_mut() {
        b.fill(0);
    }
}

/// Store `src` into the stream formed by `bufs`, from its start.
pub(crate) fn scatter(bufs: &mut [IoSliceMut<'_>], src: &[u8]) {
    let mut at = 0;
    for b in bufs.iter_mut() {
        let n = b.len().min(src.len() - at);
        b[..n].copy_from_slice(&src[at..at + n]);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn preadv_fills_each_buffer_in_order_and_refuses_eof() {
        let data: Vec<u8> = (0..200u8).collect();
        let f = file_with(&data);
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 50]);
        let mut iov = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        preadv_exact(&f, &mut iov, 10).unwrap();
        assert_eq!(a, [10, 11, 12]);
        assert_eq!(c[..], data[13..63]);
        let mut d = [0u8; 20];
        let e = preadv_exact(&f, &mut [IoSliceMut::new(&mut d)], 190).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn lists_longer_than_iov_max_go_in_turns() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let mut bufs = vec![[0u8; 2]; 1500];
        let mut iov: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        preadv_exact(&f, &mut iov, 0).unwrap();
        assert_eq!(bufs.concat(), data);

        let out = tempfile::tempfile().unwrap();
        let src: Vec<[u8; 2]> = data.chunks(2).map(|c| [c[0], c[1]]).collect();
        let iov: Vec<IoSlice<'_>> = src.iter().map(|b| IoSlice::new(b)).collect();
        pwritev_all(&out, &iov, 5).unwrap();
        let mut back = vec![0u8; 3000];
        preadv_exact(&out, &mut [IoSliceMut::new(&mut back)], 5).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn sub_slices_pick_the_right_bytes() {
        let (mut a, mut b, mut c) = ([1u8; 4], [2u8; 4], [3u8; 4]);
        let mut iov = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        let mut sub = sub_slices_mut(&mut iov, 3, 6);
        assert_eq!(sub.iter().map(|s| s.len()).collect::<Vec<_>>(), [1, 4, 1]);
        scatter(&mut sub, &[9, 8, 7, 6, 5, 4]);
        assert_eq!((a, b, c), ([1, 1, 1, 9], [8, 7, 6, 5], [4, 3, 3, 3]));
    }
}
