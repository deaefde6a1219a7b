//! The uncompressed convert: no compressor, so the cost is all copying — the source's page
//! cache into a buffer, and the buffer into the output's page cache.
//!
//! Every worker reads chunks into a few buffers of its own and writes their data itself,
//! from those buffers: no copy into a hand-off buffer and no writer pool. Raw output needs no
//! coordination at all (guest offset = file offset). qcow2 output appends plain clusters in
//! guest order: a worker hands the chunk's cluster map to a shared placement table, which
//! places every chunk whose predecessors are placed (each chunk's data clusters come out
//! contiguous in the file), and keeps reading; it writes a chunk once it is placed. A worker
//! only waits when all its buffers hold chunks not yet placed, so a preempted or slow worker
//! does not stall the others at every chunk. Writes to one file take its inode lock in turn,
//! so a worker that finds another one writing reads its next chunk instead of queueing on
//! the lock, until its buffers run out.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::{is_zero, load, ConvertOptions, ConvertStats, RunError, StatusCache};
use crate::qcow2::header::CompressionType;
use crate::qcow2::writer::StreamWriter;
use crate::{BlockDevice, Format};

/// Bytes read per chunk (rounded to whole clusters). Small enough that the buffer is still
/// in the CPU cache when it is scanned for zeroes and written out.
const CHUNK: u64 = 512 << 10;
/// Chunks a worker may have read but not yet written (its buffers).
const DEPTH: usize = 4;
/// Largest single `pwrite`. The page cache sizes the folios of a write by its length: a
/// 2 MiB write asks for 2 MiB folios, and on a host whose free memory is fragmented that
/// means direct compaction inside `pwrite` (measured: slower than 64 KiB writes).
const MAX_WRITE: usize = 64 << 10;

/// qcow2 placement, shared by the workers.
struct Placement {
    /// The next chunk to place.
    next: u64,
    /// Chunks read but waiting for an earlier one: their data-cluster maps.
    waiting: BTreeMap<u64, Vec<bool>>,
    /// Placed chunks not yet written: host offset of their first data cluster.
    placed: HashMap<u64, u64>,
    /// Workers waiting in [`wait_placed`]; a submit only wakes anyone when there are some.
    sleepers: usize,
    writer: StreamWriter,
}

impl Placement {
    /// Record chunk `idx`'s map, then place every chunk that is now next in line.
    fn submit(&mut self, idx: u64, data: Vec<bool>, per_chunk: u64) -> std::io::Result<()> {
        self.waiting.insert(idx, data);
        while let Some(data) = self.waiting.remove(&self.next) {
            let mut first = None;
            let mut expect = 0;
            for (i, _) in data.iter().enumerate().filter(|(_, &d)| d) {
                let h = self.writer.place_plain(self.next * per_chunk + i as u64)?;
                if first.is_some() && h != expect {
                    return Err(std::io::Error::other(
                        "plain clusters of a chunk were not placed contiguously",
                    ));
                }
                first.get_or_insert(h);
                expect = h + self.writer.cluster_size();
            }
            if let Some(h) = first {
                self.placed.insert(self.next, h);
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// A chunk read into one of a worker's buffers, not yet written.
struct Held {
    idx: u64,
    buf: Vec<u8>,
    data: Vec<bool>,
}

/// What the workers share.
struct Shared<'a> {
    src: &'a dyn BlockDevice,
    out: File,
    placement: Option<(Mutex<Placement>, Condvar)>,
    next: AtomicU64,
    stop: AtomicBool,
    /// Some worker is writing (see `write_out` in [`worker`]).
    writing: AtomicBool,
    cs: u64,
    per_chunk: u64,
    n_chunks: u64,
    size: u64,
}

pub(super) fn run(
    src: &dyn BlockDevice,
    file: File,
    opts: &ConvertOptions,
) -> std::result::Result<ConvertStats, RunError> {
    let cs = opts.cluster_size;
    let size = src.size();
    let per_chunk = (CHUNK / cs).max(1);
    let n_chunks = size.div_ceil(cs).div_ceil(per_chunk);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    let out = file.try_clone()?;
    let placement = match opts.format {
        Format::Qcow2 => {
            let writer =
                StreamWriter::new(file, size, cs.trailing_zeros(), CompressionType::Deflate)?;
            Some((
                Mutex::new(Placement {
                    next: 0,
                    waiting: BTreeMap::new(),
                    placed: HashMap::new(),
                    sleepers: 0,
                    writer,
                }),
                Condvar::new(),
            ))
        }
        Format::Raw => {
            // Not truncated to zero first: the temporary is empty, and on ext4 a truncate to
            // zero arms "flush on close" (see StreamWriter::new).
            file.set_len(size)?;
            None
        }
    };
    let sh = Shared {
        src,
        out,
        placement,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        writing: AtomicBool::new(false),
        cs,
        per_chunk,
        n_chunks,
        size,
    };
    let done = AtomicU64::new(0);
    let (data_clusters, zero_clusters) = (AtomicU64::new(0), AtomicU64::new(0));
    let error: Mutex<Option<RunError>> = Mutex::new(None);

    std::thread::scope(|s| {
        for _ in 0..threads.min(n_chunks.max(1) as usize) {
            s.spawn(|| {
                let progress = |h: &Held| {
                    let n_data = h.data.iter().filter(|&&d| d).count() as u64;
                    data_clusters.fetch_add(n_data, Ordering::Relaxed);
                    zero_clusters.fetch_add(h.data.len() as u64 - n_data, Ordering::Relaxed);
                    let len = h.buf.len() as u64;
                    let d = done.fetch_add(len, Ordering::SeqCst) + len;
                    if let Some(p) = &opts.progress {
                        p(d, size);
                    }
                };
                if let Err(e) = worker(&sh, &progress) {
                    error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    sh.stop.store(true, Ordering::SeqCst);
                    // Wake workers waiting for a placement that will never come.
                    if let Some((m, cv)) = &sh.placement {
                        drop(m.lock().unwrap_or_else(|e| e.into_inner()));
                        cv.notify_all();
                    }
                }
            });
        }
    });
    if let Some(e) = error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    let file = match sh.placement {
        Some((m, _)) => {
            let p = m.into_inner().unwrap_or_else(|e| e.into_inner());
            if p.next != n_chunks {
                return Err(RunError::Io(std::io::Error::other(
                    "convert ended with chunks not placed",
                )));
            }
            p.writer.finish()?
        }
        None => sh.out,
    };
    Ok(ConvertStats {
        data_clusters: data_clusters.into_inner(),
        compressed_clusters: 0,
        zero_clusters: zero_clusters.into_inner(),
        file_size: file.metadata()?.len(),
    })
}

fn worker(sh: &Shared, progress: &dyn Fn(&Held)) -> std::result::Result<(), RunError> {
    let chunk_len = (sh.per_chunk * sh.cs) as usize;
    let mut free: Vec<Vec<u8>> = Vec::new();
    let mut allocated = 0;
    // Submitted for placement (qcow2), not placed yet.
    let mut held: VecDeque<Held> = VecDeque::new();
    // Placed (or raw), not written yet: the chunk and where its first data cluster goes.
    let mut unwritten: VecDeque<(Held, Option<u64>)> = VecDeque::new();
    let mut status = StatusCache::default();
    // Write what is ready; unless `force`, only when no other worker is writing: writes to one
    // file take its inode lock in turn, and a worker that would wait for it reads on instead.
    let write_out = |unwritten: &mut VecDeque<(Held, Option<u64>)>,
                     free: &mut Vec<Vec<u8>>,
                     force: bool|
     -> std::io::Result<()> {
        if unwritten.is_empty() {
            return Ok(());
        }
        let token = !sh.writing.swap(true, Ordering::Acquire);
        if !token && !force {
            return Ok(());
        }
        let mut r = Ok(());
        while let Some((h, host)) = unwritten.pop_front() {
            if let Some(host) = host {
                r = write_chunk(sh, &h, host);
                if r.is_err() {
                    break;
                }
            }
            progress(&h);
            free.push(h.buf);
        }
        if token {
            sh.writing.store(false, Ordering::Release);
        }
        r
    };
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A buffer: a free one, a new one, or one freed by writing (after waiting for the
        // oldest held chunk to be placed, if need be).
        let mut buf = loop {
            if let Some(b) = free.pop() {
                break b;
            }
            if allocated < DEPTH {
                allocated += 1;
                break vec![0u8; chunk_len];
            }
            if !unwritten.is_empty() {
                write_out(&mut unwritten, &mut free, true)?;
                continue;
            }
            match held.pop_front() {
                Some(h) => {
                    let host = wait_placed(sh, h.idx)?;
                    unwritten.push_back((h, host));
                }
                None => return Err(RunError::Io(std::io::Error::other("no convert buffer"))),
            }
        };
        let idx = sh.next.fetch_add(1, Ordering::SeqCst);
        if idx >= sh.n_chunks {
            break;
        }
        let start = idx * sh.per_chunk * sh.cs;
        let end = (start + chunk_len as u64).min(sh.size);
        buf.resize((end - start) as usize, 0);
        let known_zero = load(sh.src, &mut status, start, end, sh.cs, &mut buf)?;
        let data: Vec<bool> = buf
            .chunks(sh.cs as usize)
            .zip(known_zero)
            .map(|(c, zero)| !zero && !is_zero(c))
            .collect();
        let h = Held { idx, buf, data };
        match &sh.placement {
            // Raw: the data goes to its guest offset.
            None => unwritten.push_back((h, Some(start))),
            // qcow2: submit the map; take back whatever of ours is placed by now.
            Some((m, cv)) => {
                let wake = {
                    let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
                    p.submit(idx, h.data.clone(), sh.per_chunk)?;
                    held.push_back(h);
                    while held.front().is_some_and(|f| f.idx < p.next) {
                        if let Some(h) = held.pop_front() {
                            let host = p.placed.remove(&h.idx);
                            unwritten.push_back((h, host));
                        }
                    }
                    p.sleepers > 0
                };
                if wake {
                    cv.notify_all();
                }
            }
        }
        let out_of_buffers = free.is_empty() && allocated >= DEPTH;
        write_out(&mut unwritten, &mut free, out_of_buffers)?;
    }
    while let Some(h) = held.pop_front() {
        let host = wait_placed(sh, h.idx)?;
        unwritten.push_back((h, host));
    }
    write_out(&mut unwritten, &mut free, true)?;
    Ok(())
}

/// Wait until chunk `idx` is placed; the host offset of its first data cluster (`None` when
/// it has none).
fn wait_placed(sh: &Shared, idx: u64) -> std::result::Result<Option<u64>, RunError> {
    let Some((m, cv)) = &sh.placement else {
        return Ok(Some(idx * sh.per_chunk * sh.cs));
    };
    let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
    while p.next <= idx {
        if sh.stop.load(Ordering::SeqCst) {
            return Err(RunError::Io(std::io::Error::other(
                "convert stopped by another worker's error",
            )));
        }
        p.sleepers += 1;
        p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
        p.sleepers -= 1;
    }
    Ok(p.placed.remove(&idx))
}

/// Write a chunk's data clusters: to `first` and on, contiguously (qcow2), or to their guest
/// offsets (raw, where `first` is the chunk's start). One run of consecutive data clusters
/// is written in pieces of at most [`MAX_WRITE`] bytes.
fn write_chunk(sh: &Shared, h: &Held, first: u64) -> std::io::Result<()> {
    let csz = sh.cs as usize;
    let mut host = first;
    let mut i = 0;
    while i < h.data.len() {
        if !h.data[i] {
            i += 1;
            if sh.placement.is_none() {
                host += sh.cs;
            }
            continue;
        }
        let run_start = i;
        while i < h.data.len() && h.data[i] {
            i += 1;
        }
        let run = &h.buf[run_start * csz..(i * csz).min(h.buf.len())];
        for piece in run.chunks(MAX_WRITE) {
            sh.out.write_all_at(piece, host)?;
            host += piece.len() as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use crate::{convert, open, ConvertOptions, Format, OpenOptions};

    /// A source whose reads fail past some offset.
    struct Failing(u64);

    impl crate::BlockDevice for Failing {
        fn size(&self) -> u64 {
            64 << 20
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::BlockResult<()> {
            if offset + buf.len() as u64 > self.0 {
                return Err(crate::BlockError::Corrupt("bad sector".into()));
            }
            buf.fill(7);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> crate::BlockResult<()> {
            Err(crate::BlockError::ReadOnly)
        }
        fn flush(&self) -> crate::BlockResult<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> crate::BlockResult<()> {
            Err(crate::BlockError::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64) -> crate::BlockResult<()> {
            Err(crate::BlockError::ReadOnly)
        }
    }

    /// A read error in one worker ends the conversion with that error (no hang, no output),
    /// whichever worker meets it and whatever the others are waiting for.
    #[test]
    fn plain_convert_source_error_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (fail_at, threads, format) in [
            (0u64, 2usize, Format::Qcow2),
            (5 << 20, 2, Format::Qcow2),
            (40 << 20, 7, Format::Qcow2),
            (40 << 20, 3, Format::Raw),
        ] {
            let out = dir.path().join("out");
            let r = convert(
                &Failing(fail_at),
                &out,
                &ConvertOptions {
                    format,
                    threads,
                    sync: false,
                    ..Default::default()
                },
            );
            let e = r.expect_err("conversion of a failing source must fail");
            assert!(e.to_string().contains("bad sector"), "{e}");
            assert!(!out.exists(), "no output after a failure");
        }
    }

    /// A raw source with data, zero clusters inside data and holes, of a size that is not a
    /// multiple of any cluster size; every output must read back identical, whatever the
    /// cluster size and the number of workers (more workers than chunks included).
    #[test]
    fn plain_convert_reads_back_identical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = dir.path().join("src.raw");
        let size: u64 = (9 << 20) + 4096 + 512;
        let mut data = vec![0u8; size as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, b) in data.iter_mut().enumerate() {
            // Data in some 192 KiB stretches, zero elsewhere (the file is written whole, so
            // zero stretches are allocated zeroes, and a hole is punched below).
            if (i / (192 << 10)) % 3 != 1 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        // The last bytes are data, so a short last cluster must be written.
        let n = data.len();
        data[n - 100..].fill(0xab);
        std::fs::write(&src_path, &data).expect("write source");
        {
            // A real hole in the middle: block status must report it.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&src_path)
                .expect("open source");
            let raw = crate::RawDevice::new(f, false).expect("raw");
            crate::BlockDevice::write_zeroes(&raw, 2 << 20, 4 << 20).expect("punch");
            data[2 << 20..6 << 20].fill(0);
        }
        let src = open(&src_path, OpenOptions::read_only()).expect("open source");
        for (cs, threads, format) in [
            (512u64, 3usize, Format::Qcow2),
            (65536, 1, Format::Qcow2),
            (65536, 8, Format::Qcow2),
            (2 << 20, 2, Format::Qcow2),
            (4096, 5, Format::Raw),
            (65536, 64, Format::Raw),
        ] {
            let out = dir.path().join(format!("out-{cs}-{threads}"));
            let seen = Arc::new(AtomicU64::new(0));
            let s2 = Arc::clone(&seen);
            let stats = convert(
                src.as_ref(),
                &out,
                &ConvertOptions {
                    format,
                    cluster_size: cs,
                    threads,
                    progress: Some(Arc::new(move |done, total| {
                        assert!(done <= total);
                        s2.fetch_max(done, std::sync::atomic::Ordering::SeqCst);
                    })),
                    sync: false,
                    ..Default::default()
                },
            )
            .expect("convert");
            assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), size);
            assert_eq!(stats.data_clusters + stats.zero_clusters, size.div_ceil(cs));
            assert!(
                stats.zero_clusters > 0,
                "{cs}/{threads}: no zero cluster seen"
            );
            let dev = open(&out, OpenOptions::read_only()).expect("open output");
            assert_eq!(dev.size(), size);
            let mut back = vec![0u8; size as usize];
            dev.read_at(&mut back, 0).expect("read back");
            assert!(
                back == data,
                "cluster {cs}, {threads} threads: content differs"
            );
            if format == Format::Qcow2 {
                let r = crate::check(&out).expect("check");
                assert!(r.is_clean(), "cluster {cs}: check: {r:?}");
            }
        }
    }
}
