//! Write-behind: start the host's writeback of what a guest wrote while the guest goes on,
//! so that its next FLUSH finds little left to write.
//!
//! Guest writes land in the host page cache and, with 24 GiB of RAM, stay dirty there until
//! the guest flushes: the kernel's background writeback starts only at a tenth of memory. A
//! FLUSH then waits for everything written since the last one (about 25 ms per 32 MiB on
//! these machines), and a guest that fsyncs often (dpkg, a journal commit) waits that long
//! each time. Once enough has been written, `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues
//! the file's dirty pages for writeback without waiting for them; the disk works while the
//! guest computes, and the FLUSH's `fdatasync` only has the rest to wait for. Durability is
//! unchanged: a FLUSH still answers only after `fdatasync`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes written since the last kick that make the next one worth its syscall: small enough
/// that a 32 MiB run of guest writes is mostly on its way when the FLUSH comes, large enough
/// that a stream of 4 KiB writes is batched into one sweep of the file.
pub(crate) const KICK_BYTES: u64 = 1 << 20;

/// Counts what was written since the last kick and starts writeback when it reaches
/// [`KICK_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct WriteBehind {
    pending: AtomicU64,
    kicks: AtomicU64,
    /// Bytes the kicks so far accounted for.
    swept: AtomicU64,
}

impl WriteBehind {
    /// Note `len` bytes written to `file`; start writeback of the file's dirty pages once
    /// enough has gathered. The whole file is swept because an image format maps guest
    /// offsets to file offsets the caller does not see. Errors are only logged: writeback
    /// starts anyway when the guest flushes, and the flush reports its own failure.
    pub(crate) fn wrote(&self, file: &File, len: u64) {
        let before = self.pending.fetch_add(len, Ordering::Relaxed);
        if before + len < KICK_BYTES {
            return;
        }
        // One caller of those that crossed the threshold together takes the whole count; one
        // that finds less (another took it first) gives back what it took.
        let taken = self.pending.swap(0, Ordering::Relaxed);
        if taken < KICK_BYTES {
            self.pending.fetch_add(taken, Ordering::Relaxed);
            return;
        }
        self.kicks.fetch_add(1, Ordering::Relaxed);
        self.swept.fetch_add(taken, Ordering::Relaxed);
        // SAFETY: sync_file_range on a file descriptor the caller keeps open for the call;
        // it takes plain integers and touches no memory of ours. Offset 0 with length 0
        // means the whole file.
        let r =
            unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if r != 0 {
            tracing::debug!(
                "write-behind: sync_file_range failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// How many times writeback was started.
    #[cfg(test)]
    pub(crate) fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn kicks_once_per_threshold_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let wb = WriteBehind::default();
        let block = vec![7u8; 64 << 10];
        let mut off = 0;
        // 15 blocks of 64 KiB: below the threshold, no kick.
        for _ in 0..15 {
            f.write_all_at(&block, off).unwrap();
            off += block.len() as u64;
            wb.wrote(&f, block.len() as u64);
        }
        assert_eq!(wb.kicks(), 0);
        // The 16th reaches 1 MiB: one kick, and the count starts again.
        f.write_all_at(&block, off).unwrap();
        wb.wrote(&f, block.len() as u64);
        assert_eq!(wb.kicks(), 1);
        wb.wrote(&f, KICK_BYTES - 1);
        assert_eq!(wb.kicks(), 1);
        wb.wrote(&f, 1);
        assert_eq!(wb.kicks(), 2);
    }

    #[test]
    fn concurrent_writers_kick_about_once_per_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let wb = WriteBehind::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..256 {
                        wb.wrote(&f, 16 << 10);
                    }
                });
            }
        });
        // 16 MiB noted in all: at most one kick per MiB, none lost or counted twice.
        let kicks = wb.kicks();
        assert!((1..=16).contains(&kicks), "{kicks} kicks for 16 MiB");
        let swept = wb.swept.load(Ordering::Relaxed);
        let pending = wb.pending.load(Ordering::Relaxed);
        assert_eq!(swept + pending, 16 << 20);
        assert!(swept >= kicks * KICK_BYTES);
    }
}
