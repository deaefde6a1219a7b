//! kiln's block layer against qemu-img on the same machine, in the same run.
//!
//! Run: `cargo bench -p kiln-disk --bench vs_qemu` (add `-- --synthetic` to skip mmdebstrap).
//! Prints kiln's time over qemu-img's for:
//!  1. compressed convert (deflate) of a realistic 2 GiB image (a Debian root made with
//!     mmdebstrap and `mkfs.ext4 -d`, cached under ~/.cache/kiln/bench/);
//!  2. uncompressed convert of the same image;
//!  3. 4 KiB writes at scattered offsets into a fresh 2 GiB qcow2, then a sequential read,
//!     through the block layer, against `qemu-img bench` with the same offsets.
//!
//! If mmdebstrap fails, the image is synthetic and every line says so.
//!
//! Conversions are timed as processes on both sides: kiln's is this binary re-run as
//! `--kiln-convert SRC DST FORMAT COMPRESSION`, so start-up and opening the source count, as
//! they do for qemu-img. Each case prints the best and the median round, and the load
//! average, since the build machine is shared.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_disk::{
    convert, create, open, BlockDevice, Compression, ConvertOptions, CreateOptions, Format,
    OpenOptions,
};

const IMAGE_SIZE: u64 = 2 << 30;

fn run(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/kiln/bench")
}

/// The realistic image, built once; `None` when mmdebstrap or mkfs.ext4 fails.
fn debian_image() -> Option<PathBuf> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let img = dir.join("debian-bookworm-minbase-ext4-2G.raw");
    if img.exists() {
        return Some(img);
    }
    let root = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("building the benchmark image with mmdebstrap (about 75 s, once)...");
    let ok = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet", "bookworm"])
        .arg(&root)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("mmdebstrap failed: falling back to a SYNTHETIC image");
        return None;
    }
    let tmp = dir.join("img.tmp");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&tmp)
        .arg("2G")
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_dir_all(&root);
    if !ok {
        eprintln!("mkfs.ext4 -d failed: falling back to a SYNTHETIC image");
        return None;
    }
    std::fs::rename(&tmp, &img).ok()?;
    Some(img)
}

/// A clearly labelled stand-in: 2 GiB sparse with ~600 MiB of mixed text-like and random data.
fn synthetic_image() -> PathBuf {
    let img = cache_dir().join("synthetic-2G.raw");
    if img.exists() {
        return img;
    }
    std::fs::create_dir_all(cache_dir()).expect("cache dir");
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(IMAGE_SIZE).expect("size");
    let mut x = 0x1234_5678u64;
    let mut buf = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    for mb in 0..2048u64 {
        if mb % 10 > 2 {
            continue;
        }
        for (i, c) in buf.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = if mb % 2 == 0 {
                x.to_le_bytes()
            } else {
                *b"kiln fs "
            };
            c.copy_from_slice(&v[..c.len()]);
            if mb % 2 == 1 && i % 64 == 0 {
                c[0] = x as u8;
            }
        }
        f.write_all_at(&buf, mb << 20).expect("write");
    }
    img
}

/// Timings of one side: every round's time for one operation.
struct Times(Vec<Duration>);

impl Times {
    fn min(&self) -> f64 {
        self.0.iter().min().map_or(f64::NAN, Duration::as_secs_f64)
    }
    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

fn ratio(name: &str, label: &str, kiln: &Times, qemu: &Times) {
    println!(
        "{name:<44} kiln {:>7.3} s   qemu {:>7.3} s   kiln/qemu = {:.2}  (speedup {:.2}x){label}",
        kiln.min(),
        qemu.min(),
        kiln.min() / qemu.min(),
        qemu.min() / kiln.min()
    );
    println!(
        "{:<44} median: kiln {:>7.3} s   qemu {:>7.3} s   kiln/qemu = {:.2}  (speedup {:.2}x)  [{} rounds, load {}]",
        "",
        kiln.median(),
        qemu.median(),
        kiln.median() / qemu.median(),
        qemu.median() / kiln.median(),
        kiln.0.len(),
        load_average(),
    );
}

/// The 1, 5 and 15 minute load averages, as the kernel reports them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// qemu-img convert does not fsync its output (cache=unsafe by default), so kiln is timed
/// without its fsync-before-rename too; both outputs are equally (non-)durable.
fn no_sync() -> ConvertOptions {
    ConvertOptions {
        sync: false,
        ..Default::default()
    }
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Flush dirty pages so one measurement does not pay for the previous one's writeback.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Time kiln and qemu-img `rounds` times each, alternating which goes first, after a `sync`
/// each time; every time is kept (min and median are reported: the machine is shared).
fn pair(
    rounds: usize,
    mut kiln: impl FnMut() -> Duration,
    mut qemu: impl FnMut() -> Duration,
) -> (Times, Times) {
    let (mut k, mut q) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            settle();
            q.push(qemu());
            settle();
            k.push(kiln());
        } else {
            settle();
            k.push(kiln());
            settle();
            q.push(qemu());
        }
    }
    (Times(k), Times(q))
}

/// The child-process side of a kiln conversion: `BENCH --kiln-convert SRC DST FORMAT COMPRESS`.
/// kiln is timed as a process, like qemu-img: start-up and opening the source count too.
fn convert_child(args: &[String]) {
    let [src, dst, format, compress] = args else {
        panic!("--kiln-convert SRC DST raw|qcow2 none|deflate|zstd");
    };
    let opts = ConvertOptions {
        format: if format == "raw" {
            Format::Raw
        } else {
            Format::Qcow2
        },
        compress: match compress.as_str() {
            "deflate" => Some(Compression::DEFLATE),
            "zstd" => Some(Compression::ZSTD),
            _ => None,
        },
        ..no_sync()
    };
    let dev = open(src, OpenOptions::read_only()).expect("open");
    convert(dev.as_ref(), Path::new(dst), &opts).expect("convert");
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--kiln-convert") {
        convert_child(&args[2..]);
        return;
    }
    // `cargo bench` passes `--bench`; ignore unknown flags.
    let synthetic_only = std::env::args().any(|a| a == "--synthetic");
    let rounds: usize = std::env::var("KILN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    // The uncompressed converts take a few tenths of a second: more rounds, and several
    // conversions per timing (below), so a timing is not one scheduler hiccup.
    let short_rounds = rounds.max(7);
    let (src, label) = match (!synthetic_only).then(debian_image).flatten() {
        Some(p) => (p, ""),
        None => (synthetic_image(), "  [SYNTHETIC image]"),
    };
    let work = tempfile::tempdir_in(cache_dir()).expect("tempdir");
    let w = |n: &str| work.path().join(n);
    println!(
        "source: {} ({} bytes, {} allocated){label}",
        src.display(),
        size_of(&src),
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&src)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        }
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let version = Command::new("qemu-img")
        .arg("--version")
        .output()
        .expect("qemu-img")
        .stdout;
    println!(
        "machine: {threads} cores; {}; {rounds} alternating rounds each \
         ({short_rounds} for the uncompressed converts); load average {}",
        String::from_utf8_lossy(&version)
            .lines()
            .next()
            .unwrap_or(""),
        load_average(),
    );
    println!("first line per case: best round; second: median round");

    // Warm the page cache so both sides read from memory.
    let _ = run(Command::new("cat")
        .arg(&src)
        .stdout(std::process::Stdio::null()));
    let me = std::env::current_exe().expect("own path");

    // (name, output, kiln's format and compression, qemu-img's arguments, short case)
    type Case<'a> = (&'a str, &'a str, [&'a str; 2], &'a [&'a str], bool);
    let conversions: [Case; 4] = [
        (
            "compressed convert (deflate)",
            "c.qcow2",
            ["qcow2", "deflate"],
            &["convert", "-c", "-O", "qcow2"],
            false,
        ),
        (
            "compressed convert (zstd)",
            "z.qcow2",
            ["qcow2", "zstd"],
            &[
                "convert",
                "-c",
                "-o",
                "compression_type=zstd",
                "-O",
                "qcow2",
            ],
            false,
        ),
        (
            "uncompressed convert (qcow2)",
            "u.qcow2",
            ["qcow2", "none"],
            &["convert", "-O", "qcow2"],
            true,
        ),
        (
            "uncompressed convert (raw)",
            "u.raw",
            ["raw", "none"],
            &["convert", "-O", "raw"],
            true,
        ),
    ];
    // KILN_BENCH_ONLY=text runs only the conversions whose name contains it.
    let only = std::env::var("KILN_BENCH_ONLY").ok();
    for (name, out, [kfmt, kcomp], qargs, short) in conversions {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let outs = |side: &str, n: usize| -> Vec<PathBuf> {
            (0..n).map(|i| w(&format!("{side}{i}-{out}"))).collect()
        };
        let kiln_cmd = |dst: &Path| {
            let mut c = Command::new(&me);
            c.arg("--kiln-convert")
                .arg(&src)
                .arg(dst)
                .args([kfmt, kcomp]);
            c
        };
        let qemu_cmd = |dst: &Path| {
            let mut c = Command::new("qemu-img");
            c.args(qargs).arg(&src).arg(dst);
            c
        };
        // Short cases: enough conversions per timing that a timing lasts about a second
        // (calibrated on qemu-img), each to its own new file; both sides do the same number.
        // Outputs are deleted before each timing, outside it, so neither side pays for
        // freeing the previous round's file.
        let reps = if short {
            let t = run(&mut qemu_cmd(&w("calibrate"))).as_secs_f64();
            let _ = std::fs::remove_file(w("calibrate"));
            ((1.0 / t.max(0.01)).ceil() as usize).clamp(1, 8)
        } else {
            1
        };
        let timing = |side: &str, cmd: &dyn Fn(&Path) -> Command| {
            let files = outs(side, reps);
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            settle();
            let t = Instant::now();
            for f in &files {
                run(&mut cmd(f));
            }
            t.elapsed() / reps as u32
        };
        let (k, q) = pair(
            if short { short_rounds } else { rounds },
            || timing("k", &kiln_cmd),
            || timing("q", &qemu_cmd),
        );
        ratio(name, label, &k, &q);
        let (kout, qout) = (&outs("k", 1)[0], &outs("q", 1)[0]);
        println!(
            "    output sizes: kiln {} bytes, qemu-img {} bytes{}",
            size_of(kout),
            size_of(qout),
            if reps > 1 {
                format!("; {reps} conversions per timing, time per conversion shown")
            } else {
                String::new()
            }
        );
        run(Command::new("qemu-img").arg("compare").arg(&src).arg(kout));
        if !out.ends_with(".raw") {
            run(Command::new("qemu-img").arg("check").arg(kout));
        }
        for f in outs("k", reps).iter().chain(&outs("q", reps)) {
            let _ = std::fs::remove_file(f);
        }
    }

    if only.is_some() {
        println!("load average at the end: {}", load_average());
        return;
    }

    // 4 KiB writes at scattered offsets, then a sequential read, on fresh 2 GiB qcow2 images.
    let count: u64 = 50_000;
    // qemu-img bench advances by `step` and wraps at the image size; a step of an odd number
    // of 4 KiB blocks scatters the writes over the image. kiln writes the same offsets and the
    // same byte (0xa5 = 165); `qemu-img compare` of the two results proves it.
    let step: u64 = 4096 * 12_289;
    let (qimg, kimg) = (w("q-bench.qcow2"), w("k-bench.qcow2"));
    let (k, q) = pair(
        rounds,
        || {
            let _ = std::fs::remove_file(&kimg);
            create(
                &kimg,
                &CreateOptions {
                    size: Some(IMAGE_SIZE),
                    ..Default::default()
                },
            )
            .expect("create");
            let dev: Arc<dyn BlockDevice> = open(&kimg, OpenOptions::read_write()).expect("open");
            timed(|| {
                std::thread::scope(|s| {
                    for th in 0..threads as u64 {
                        let dev = Arc::clone(&dev);
                        s.spawn(move || {
                            let buf = vec![0xa5u8; 4096];
                            let mut i = th;
                            while i < count {
                                dev.write_at(&buf, (i * step) % IMAGE_SIZE).expect("write");
                                i += threads as u64;
                            }
                        });
                    }
                });
                dev.flush().expect("flush");
            })
        },
        || {
            let _ = std::fs::remove_file(&qimg);
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&qimg)
                .arg(IMAGE_SIZE.to_string()));
            run(Command::new("qemu-img")
                .args([
                    "bench",
                    "-w",
                    "-f",
                    "qcow2",
                    "-c",
                    &count.to_string(),
                    "-s",
                    "4096",
                ])
                .args([
                    "-S",
                    &step.to_string(),
                    "--pattern=165",
                    "--flush-interval",
                    &count.to_string(),
                ])
                .arg(&qimg))
        },
    );
    ratio(
        &format!("{count} x 4 KiB scattered writes + flush"),
        "",
        &k,
        &q,
    );
    run(Command::new("qemu-img").arg("check").arg(&kimg));
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(&qimg)
        .arg(&kimg));

    let reads = IMAGE_SIZE >> 20;
    let (k, q) = pair(
        rounds,
        || {
            // Requests in flight on every core, as qemu-img bench keeps 64 in flight.
            let dev = open(&kimg, OpenOptions::read_only()).expect("open");
            timed(|| {
                std::thread::scope(|s| {
                    for th in 0..threads as u64 {
                        let dev = Arc::clone(&dev);
                        s.spawn(move || {
                            let mut buf = vec![0u8; 1 << 20];
                            let mut i = th;
                            while i < reads {
                                dev.read_at(&mut buf, i << 20).expect("read");
                                i += threads as u64;
                            }
                        });
                    }
                });
            })
        },
        || {
            run(Command::new("qemu-img")
                .args(["bench", "-f", "qcow2", "-c", &reads.to_string(), "-s", "1M"])
                .arg(&qimg))
        },
    );
    ratio("sequential read of 2 GiB, 1 MiB requests", "", &k, &q);
    println!("load average at the end: {}", load_average());
}
