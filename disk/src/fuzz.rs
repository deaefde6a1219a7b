//! The fuzz entry point: arbitrary bytes opened as an image and read.
//!
//! Lives in the library (not only in `fuzz/`) so a normal unit test runs it over pseudo-random
//! inputs on stable Rust.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use crate::{open, BlockDevice, OpenOptions};

/// An anonymous in-memory file holding `data` (no disk I/O, nothing left behind).
fn memfd(data: &[u8]) -> Option<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned descriptor is owned
    // by the File from here on.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data).ok()?;
    Some(f)
}

/// Open `data` as a qcow2 (or raw) image and read from it; must never panic, hang or
/// allocate beyond what the input's length justifies.
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    let Some(f) = memfd(data) else { return };
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
    // Depth 1: a fuzzed header must not make us open arbitrary host files as backing.
    let opts = OpenOptions {
        max_chain_depth: 1,
        ..OpenOptions::read_only()
    };
    if let Ok(dev) = open(&path, opts) {
        read_some(dev.as_ref(), data);
    }
    if let Ok(dev) = crate::open::open_own_limited(&path, 1) {
        read_some(dev.as_ref(), data);
    }
    let _ = crate::check(std::path::Path::new(&path));
    let _ = crate::open::chain(
        std::path::Path::new(&path),
        None,
        1,
        &crate::BackingPolicy::Follow,
    )
    .and_then(|_| crate::map(&path, &crate::BackingPolicy::Follow));
    drop(f);
}

fn read_some(dev: &dyn BlockDevice, data: &[u8]) {
    let size = dev.size();
    let mut buf = vec![0u8; 65536];
    let seed = data
        .iter()
        .take(64)
        .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    let offsets = [0, size.saturating_sub(65536), seed % size.max(1), size / 2];
    for off in offsets {
        let len = (size - off.min(size)).min(buf.len() as u64) as usize;
        let _ = dev.read_at(&mut buf[..len], off);
        let _ = dev.block_status(off, len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::fuzz_entry;

    /// A valid small qcow2 from kiln's own writer, as a seed to mutate.
    fn seed_image() -> Vec<u8> {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s.qcow2");
        crate::create(
            &p,
            &crate::CreateOptions {
                size: Some(4 << 20),
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .expect("create");
        let dev = crate::open(&p, crate::OpenOptions::read_write()).expect("open");
        dev.write_at(&[0xab; 20000], 5000).expect("write");
        drop(dev);
        std::fs::read(&p).expect("read")
    }

    #[test]
    fn fuzz_entry_survives_mutations() {
        let base = seed_image();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // The unmutated seed must open and read correctly through the same memfd path, or
        // the mutations below would exercise nothing.
        {
            let f = super::memfd(&base).expect("memfd");
            let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
            let opts = crate::OpenOptions {
                max_chain_depth: 1,
                ..crate::OpenOptions::read_only()
            };
            let dev = crate::open(&path, opts).expect("seed opens");
            let mut b = vec![0u8; 100];
            dev.read_at(&mut b, 5000).expect("seed reads");
            assert!(b.iter().all(|&x| x == 0xab));
            let own = crate::open::open_own_limited(&path, 1).expect("own reader opens seed");
            own.read_at(&mut b, 24_000).expect("own reads");
            assert!(b.iter().all(|&x| x == 0xab));
            assert!(crate::check(std::path::Path::new(&path))
                .expect("check")
                .is_clean());
        }
        fuzz_entry(&base);
        fuzz_entry(&[]);
        fuzz_entry(b"QFI\xfb");
        for i in 0..300 {
            let mut d = base.clone();
            // Mutate mostly the header and first tables, where the claims live.
            for _ in 0..(1 + rnd() % 8) {
                let span = if i % 2 == 0 { 512 } else { d.len() as u64 };
                let at = (rnd() % span) as usize;
                d[at] = rnd() as u8;
            }
            if i % 10 == 0 {
                d.truncate((rnd() % d.len() as u64) as usize);
            }
            fuzz_entry(&d);
        }
    }
}
