//! Convert and flatten: read any [`BlockDevice`] (a whole chain), write a fresh raw or
//! qcow2 image, compressing on all cores.
//!
//! Workers take fixed-size chunks of the guest range in turn, skip holes (block status) and
//! all-zero clusters, compress, and hand the result to the calling thread, which writes
//! chunks strictly in order through the [`StreamWriter`]. A window bounds how far workers may
//! run ahead, so memory stays at about `threads * 2 * chunk` whatever the disk size.
//! Uncompressed conversions take a leaner path without the hand-off ([`plain`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{io_err, DiskError, Result};
use crate::qcow2::header::CompressionType;
use crate::qcow2::writer::StreamWriter;
use crate::{BlockDevice, BlockError, BlockStatus, Format};

mod plain;

/// Compression for a qcow2 output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate with a 4 KiB window (what qemu's decompressor accepts), level 0-9.
    Deflate { level: u32 },
    /// zstd (qcow2 `compression_type=zstd`), level 1-22.
    Zstd { level: i32 },
}

impl Compression {
    /// Deflate at the level kiln uses by default: fast, and still close to qemu-img's size.
    pub const DEFLATE: Compression = Compression::Deflate { level: 2 };
    /// zstd at its default level.
    pub const ZSTD: Compression = Compression::Zstd { level: 3 };

    fn kind(self) -> CompressionType {
        match self {
            Compression::Deflate { .. } => CompressionType::Deflate,
            Compression::Zstd { .. } => CompressionType::Zstd,
        }
    }
}

/// Progress of a conversion: guest bytes processed so far and the total.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Options of [`convert`].
#[derive(Clone)]
pub struct ConvertOptions {
    pub format: Format,
    /// Only for qcow2 output.
    pub compress: Option<Compression>,
    /// qcow2 cluster size (power of two, 512 B to 2 MiB).
    pub cluster_size: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    pub progress: Option<Arc<ProgressFn>>,
    /// fsync the output before renaming it into place (default). Only scratch outputs that
    /// may be lost on a host crash should turn this off.
    pub sync: bool,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("format", &self.format)
            .field("compress", &self.compress)
            .field("cluster_size", &self.cluster_size)
            .field("threads", &self.threads)
            .field("sync", &self.sync)
            .finish()
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Qcow2,
            compress: None,
            cluster_size: 65536,
            threads: 0,
            progress: None,
            sync: true,
        }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertStats {
    pub data_clusters: u64,
    pub compressed_clusters: u64,
    pub zero_clusters: u64,
    pub file_size: u64,
}

enum Out {
    Zero,
    Plain(Vec<u8>),
    Compressed(Vec<u8>),
}

struct Chunk {
    first_cluster: u64,
    clusters: Vec<Out>,
}

/// Per-thread compressor state, reused across clusters (also by the thin capture).
pub(crate) enum Compressor {
    None,
    Deflate(flate2::Compress),
    Zstd(zstd::bulk::Compressor<'static>),
}

impl Compressor {
    pub(crate) fn new(c: Option<Compression>) -> std::io::Result<Compressor> {
        Ok(match c {
            None => Compressor::None,
            // Level 1 is raised to 2: zlib-rs's level-1 "quick" strategy panics with the 4 KiB
            // window qcow2 needs (zlib-rs 0.6.8, deflate.rs send_bits_overflow).
            Some(Compression::Deflate { level }) => {
                Compressor::Deflate(flate2::Compress::new_with_window_bits(
                    flate2::Compression::new(if level == 1 { 2 } else { level.min(9) }),
                    false,
                    12,
                ))
            }
            Some(Compression::Zstd { level }) => {
                Compressor::Zstd(zstd::bulk::Compressor::new(level)?)
            }
        })
    }

    /// Compress one cluster; `None` when it does not shrink enough to be worth it.
    pub(crate) fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if matches!(self, Compressor::None) {
            return None;
        }
        // Must be strictly shorter than a cluster; require saving at least a sector.
        let limit = data.len().checked_sub(512)?;
        let mut out = vec![0u8; limit];
        match self {
            Compressor::None => return None,
            Compressor::Deflate(d) => {
                // Room for the worst case (deflateBound): zlib-rs mishandles a full output
                // buffer with small windows, so never let it fill.
                out.resize(data.len() + data.len() / 8 + 1024, 0);
                d.reset();
                let st = d
                    .compress(data, &mut out, flate2::FlushCompress::Finish)
                    .ok()?;
                if st != flate2::Status::StreamEnd {
                    return None;
                }
                out.truncate(d.total_out() as usize);
            }
            Compressor::Zstd(z) => {
                // A bound-sized buffer keeps zstd on its fast path (no per-step capacity
                // checks); the size limit is applied afterwards.
                out.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
                let n = z.compress_to_buffer(data, &mut out[..]).ok()?;
                out.truncate(n);
            }
        }
        (!out.is_empty() && out.len() < limit).then_some(out)
    }
}

/// A temporary file in `dst`'s folder, so the finished image is renamed into place.
pub(crate) fn temp_beside(dst: &Path, prefix: &str) -> Result<tempfile::NamedTempFile> {
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .map_err(io_err(dir))
}

/// Write `src` to `dst` as a new image, atomically (temporary name, then rename).
///
/// Holes and all-zero clusters are not written; a chain is flattened into one image.
pub fn convert(src: &dyn BlockDevice, dst: &Path, opts: &ConvertOptions) -> Result<ConvertStats> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(DiskError::Invalid(format!(
            "cluster size {cs} must be a power of two from 512 to 2 MiB"
        )));
    }
    if opts.format == Format::Raw && opts.compress.is_some() {
        return Err(DiskError::Invalid("raw output cannot be compressed".into()));
    }
    let tmp = temp_beside(dst, ".kiln-convert-")?;
    // Held until the end: `kiln` start-up clean-up removes only temporaries it can lock.
    tmp.as_file()
        .try_lock()
        .map_err(|e| io_err(tmp.path())(e.into()))?;
    let file = tmp.as_file().try_clone().map_err(io_err(tmp.path()))?;
    let stats = run(src, file, opts).map_err(|e| match e {
        RunError::Io(source) => DiskError::Io {
            path: dst.to_path_buf(),
            source,
        },
        RunError::Src(source) => DiskError::Device(source),
    })?;
    if opts.sync {
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    }
    tmp.persist(dst).map_err(|e| DiskError::Io {
        path: dst.to_path_buf(),
        source: e.error,
    })?;
    Ok(stats)
}

enum RunError {
    Io(std::io::Error),
    Src(BlockError),
}

impl From<std::io::Error> for RunError {
    fn from(e: std::io::Error) -> Self {
        RunError::Io(e)
    }
}

fn run(
    src: &dyn BlockDevice,
    file: File,
    opts: &ConvertOptions,
) -> std::result::Result<ConvertStats, RunError> {
    if opts.compress.is_none() {
        return plain::run(src, file, opts);
    }
    let cs = opts.cluster_size;
    let size = src.size();
    let total_clusters = size.div_ceil(cs);
    // Chunks of about 2 MiB keep the hand-off cheap for small clusters.
    let per_chunk = ((2u64 << 20) / cs).max(1);
    let n_chunks = total_clusters.div_ceil(per_chunk);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let window = (threads as u64) * 4;

    enum Sink {
        Qcow2(StreamWriter),
        Raw(File),
    }
    // Data is written by a pool of writer threads: the page-cache copy is the main cost of
    // an uncompressed convert, and one thread doing it all is the bottleneck.
    let out_file = file.try_clone()?;
    let (wtx, wrx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads * 8);
    let wrx = Mutex::new(wrx);
    let write_error: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let mut sink = match opts.format {
        Format::Qcow2 => Sink::Qcow2(StreamWriter::new(
            file,
            size,
            cs.trailing_zeros(),
            opts.compress
                .map_or(CompressionType::Deflate, Compression::kind),
        )?),
        Format::Raw => {
            file.set_len(size)?;
            Sink::Raw(file)
        }
    };

    let next = AtomicU64::new(0);
    let written = (Mutex::new(0u64), Condvar::new());
    let stop = AtomicBool::new(false);
    let mut stats = ConvertStats::default();

    let result = std::thread::scope(|s| -> std::result::Result<(), RunError> {
        let (tx, rx) = mpsc::channel::<std::result::Result<(u64, Chunk), RunError>>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, written, stop) = (&next, &written, &stop);
            s.spawn(move || {
                let mut comp = match Compressor::new(opts.compress) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(RunError::Io(e)));
                        return;
                    }
                };
                let mut buf = vec![0u8; (per_chunk * cs) as usize];
                let mut status = StatusCache::default();
                loop {
                    let idx = next.fetch_add(1, Ordering::SeqCst);
                    if idx >= n_chunks || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // Do not run more than `window` chunks ahead of the writer.
                    {
                        let mut w = written.0.lock().unwrap_or_else(|e| e.into_inner());
                        while idx >= *w + window && !stop.load(Ordering::SeqCst) {
                            w = written.1.wait(w).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    let r = read_chunk(src, idx, per_chunk, cs, &mut buf, &mut comp, &mut status);
                    let failed = r.is_err();
                    if tx.send(r.map(|c| (idx, c))).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // At least 4 writers: the copies block on page-cache and file-system locks, so more
        // writers than cores still helps (qemu-img keeps 8 requests in flight).
        for _ in 0..threads.max(4) {
            let (wrx, write_error, out_file, stop) = (&wrx, &write_error, &out_file, &stop);
            s.spawn(move || loop {
                let job = wrx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((off, data)) = job else { return };
                if let Err(e) = out_file.write_all_at(&data, off) {
                    write_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    stop.store(true, Ordering::SeqCst);
                }
            });
        }
        let wtx = wtx;

        let mut pending: BTreeMap<u64, Chunk> = BTreeMap::new();
        let mut want = 0u64;
        let fail = |e| {
            stop.store(true, Ordering::SeqCst);
            written.1.notify_all();
            Err(e)
        };
        while want < n_chunks {
            let Ok(msg) = rx.recv() else {
                return fail(RunError::Io(std::io::Error::other(
                    "convert workers stopped early",
                )));
            };
            match msg {
                Ok((idx, chunk)) => {
                    pending.insert(idx, chunk);
                }
                Err(e) => return fail(e),
            }
            while let Some(chunk) = pending.remove(&want) {
                for (i, out) in chunk.clusters.into_iter().enumerate() {
                    let gc = chunk.first_cluster + i as u64;
                    let placed = match (&mut sink, out) {
                        (_, Out::Zero) => {
                            stats.zero_clusters += 1;
                            continue;
                        }
                        (Sink::Qcow2(w), Out::Plain(d)) => {
                            stats.data_clusters += 1;
                            w.place_plain(gc).map(|off| (off, d))
                        }
                        (Sink::Qcow2(w), Out::Compressed(d)) => {
                            stats.compressed_clusters += 1;
                            w.place_compressed(gc, d.len() as u64).map(|off| (off, d))
                        }
                        (Sink::Raw(_), Out::Plain(d)) | (Sink::Raw(_), Out::Compressed(d)) => {
                            stats.data_clusters += 1;
                            Ok((gc * cs, d))
                        }
                    };
                    match placed {
                        Ok(job) => {
                            if wtx.send(job).is_err() || stop.load(Ordering::SeqCst) {
                                return fail(RunError::Io(std::io::Error::other(
                                    "convert writers stopped early",
                                )));
                            }
                        }
                        Err(e) => return fail(RunError::Io(e)),
                    }
                }
                want += 1;
                *written.0.lock().unwrap_or_else(|e| e.into_inner()) = want;
                written.1.notify_all();
                if let Some(p) = &opts.progress {
                    p((want * per_chunk * cs).min(size), size);
                }
            }
        }
        drop(wtx);
        Ok(())
    });
    if let Some(e) = write_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(RunError::Io(e));
    }
    result?;

    let file = match sink {
        Sink::Qcow2(w) => w.finish()?,
        Sink::Raw(f) => f,
    };
    stats.file_size = file.metadata()?.len();
    Ok(stats)
}

fn read_chunk(
    src: &dyn BlockDevice,
    idx: u64,
    per_chunk: u64,
    cs: u64,
    buf: &mut [u8],
    comp: &mut Compressor,
    status: &mut StatusCache,
) -> std::result::Result<Chunk, RunError> {
    let first_cluster = idx * per_chunk;
    let start = first_cluster * cs;
    let end = (start + per_chunk * cs).min(src.size());
    let len = (end - start) as usize;
    let buf = &mut buf[..len];
    let csz = cs as usize;
    let known_zero = load(src, status, start, end, cs, buf)?;
    let clusters = buf
        .chunks(csz)
        .zip(known_zero)
        .map(|(c, zero)| {
            if zero || is_zero(c) {
                Out::Zero
            } else if c.len() as u64 == cs {
                // A compressor panic (a library bug) must not abort the conversion: store the
                // cluster plain instead.
                let z = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| comp.compress(c)));
                match z.ok().flatten() {
                    Some(z) => Out::Compressed(z),
                    None => Out::Plain(c.to_vec()),
                }
            } else {
                // A short last cluster is stored plain (compressed clusters are whole).
                Out::Plain(c.to_vec())
            }
        })
        .collect();
    Ok(Chunk {
        first_cluster,
        clusters,
    })
}

/// A worker's last block-status answer. The device is asked about everything up to its end,
/// not just the current chunk, and the answer is kept: a raw file answers with two `lseek`s
/// per extent instead of two per chunk, and those scan the page cache of long holes.
#[derive(Default)]
struct StatusCache {
    from: u64,
    to: u64,
    status: Option<BlockStatus>,
}

impl StatusCache {
    /// The status at `pos` and how many bytes from `pos` it holds for.
    fn get(
        &mut self,
        src: &dyn BlockDevice,
        pos: u64,
    ) -> std::result::Result<(BlockStatus, u64), RunError> {
        if let Some(st) = self.status {
            if (self.from..self.to).contains(&pos) {
                return Ok((st, self.to - pos));
            }
        }
        let rest = src.size() - pos;
        let (st, n) = src.block_status(pos, rest).map_err(RunError::Src)?;
        let n = n.clamp(1, rest);
        *self = StatusCache {
            from: pos,
            to: pos + n,
            status: Some(st),
        };
        Ok((st, n))
    }
}

/// Read `start..end` of `src` into `buf` (exactly that long) and say which clusters of it are
/// known to be zero. Block status comes first: holes are neither read, scanned nor even
/// zero-filled; clusters wholly inside a hole are known zero (their bytes in `buf` are stale).
fn load(
    src: &dyn BlockDevice,
    status: &mut StatusCache,
    start: u64,
    end: u64,
    cs: u64,
    buf: &mut [u8],
) -> std::result::Result<Vec<bool>, RunError> {
    let len = buf.len();
    let csz = cs as usize;
    let ncl = len.div_ceil(csz);
    let mut known_zero = vec![false; ncl];
    let mut pos = start;
    while pos < end {
        let (st, n) = status.get(src, pos)?;
        let n = n.clamp(1, end - pos);
        let (a, b) = ((pos - start) as usize, (pos - start + n) as usize);
        match st {
            BlockStatus::Zero => {
                let first_full = a.div_ceil(csz);
                let last_full = if b == len { ncl } else { b / csz };
                if first_full < last_full {
                    known_zero[first_full..last_full].fill(true);
                    buf[a..first_full * csz].fill(0);
                    buf[(last_full * csz).min(b)..b].fill(0);
                } else {
                    buf[a..b].fill(0);
                }
            }
            BlockStatus::Data => src.read_at(&mut buf[a..b], pos).map_err(RunError::Src)?,
        }
        pos += n;
    }
    Ok(known_zero)
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u128; align_to handles the alignment.
    let (head, words, tail) = unsafe { b.align_to::<u128>() };
    // OR-fold blocks of 256 bytes (vectorizes), stopping at the first non-zero block.
    head.iter().all(|&x| x == 0)
        && tail.iter().all(|&x| x == 0)
        && words
            .chunks(16)
            .all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
}
