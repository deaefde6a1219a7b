//! Exec round-trip latency and file throughput over the local (Unix socket) transport,
//! against the real agent binary. Run: `cargo bench -p kiln-agent --bench agent`.
//! Options (after `--`): `--iterations N` (exec round trips, default 1000), `--mib N`
//! (upload/download size, default 1024), `--dir DIR` (where the agent writes, default a
//! temporary directory), `--agent PATH` (default: the bench's own build of kiln-agent).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::{Client, ExecRequest, PutOptions};

/// Bytes from a 4 MiB buffer, repeated: the source costs (almost) nothing.
struct Repeat {
    buf: Vec<u8>,
    pos: usize,
    left: u64,
}

impl Read for Repeat {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = out
            .len()
            .min(self.left as usize)
            .min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % self.buf.len();
        self.left -= n as u64;
        Ok(n)
    }
}

fn loadavg() -> (String, String, String) {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = s.split_whitespace().map(str::to_string);
    (
        f.next().unwrap_or_default(),
        f.next().unwrap_or_default(),
        f.next().unwrap_or_default(),
    )
}

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// CPU seconds (user + system) used so far by this process and by the agent.
fn cpu_seconds(agent_pid: u32) -> (f64, f64) {
    // SAFETY: rusage is plain data that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let me = tv(ru.ru_utime) + tv(ru.ru_stime);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let agent = std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm.
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
        })
        .unwrap_or(0.0);
    (me, agent)
}

fn main() {
    let mut iterations = 1000usize;
    let mut mib = 1024u64;
    let mut dir: Option<PathBuf> = None;
    let mut agent = PathBuf::from(env!("CARGO_BIN_EXE_kiln-agent"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--iterations N")
            }
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--dir" => dir = Some(PathBuf::from(args.next().expect("--dir DIR"))),
            "--agent" => {
                // cargo runs benches in the crate folder; a relative path is meant from
                // the workspace root, where the README's command is typed.
                let p = PathBuf::from(args.next().expect("--agent PATH"));
                agent = if p.is_relative() && !p.exists() {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
                } else {
                    p
                };
            }
            _ => {} // cargo bench passes --bench
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let sock = tmp.path().join("agent.sock");
    let mut child = Command::new(&agent)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start kiln-agent");
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "agent did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("agent: {}", agent.display());

    // exec `true`: request -> started -> exited, over one connection.
    let mut c = Client::connect_unix(&sock).expect("connect");
    let req = ExecRequest::argv(["true"]);
    for _ in 0..20 {
        c.exec_output(&req).expect("warm-up exec");
    }
    let cpu0 = cpu_seconds(child.id());
    let mut lat: Vec<Duration> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            let o = c.exec_output(&req).expect("exec true");
            assert!(o.status.success());
            t.elapsed()
        })
        .collect();
    let cpu1 = cpu_seconds(child.id());
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "exec `true` round trip ({iterations} runs): mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms",
        mean.as_secs_f64() * 1e3,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    println!(
        "  CPU per exec: agent {:.3} ms, client {:.3} ms (the command itself not included)",
        (cpu1.1 - cpu0.1) * 1e3 / iterations as f64,
        (cpu1.0 - cpu0.0) * 1e3 / iterations as f64
    );

    // Connect + hello + exec `true`, a fresh session each time.
    let n = (iterations / 4).max(1);
    let t = Instant::now();
    for _ in 0..n {
        let mut c = Client::connect_unix(&sock).expect("connect");
        c.exec_output(&req).expect("exec");
    }
    println!(
        "connect + hello + exec `true` ({n} runs): mean {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );

    // Upload and download, SHA-256 checked on both sides.
    let len = mib << 20;
    let mut buf = vec![0u8; 4 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // Context for the numbers below: SHA-256 alone on this CPU (both sides hash every byte).
    {
        use sha2::Digest;
        let t = Instant::now();
        let mut h = sha2::Sha256::new();
        for _ in 0..64 {
            h.update(&buf);
        }
        let _ = h.finalize();
        println!(
            "sha256 alone: {:.0} MB/s",
            (64 * buf.len()) as f64 / t.elapsed().as_secs_f64() / 1e6
        );
    }
    let dest = dir.join("kiln-bench-upload.bin");
    let dest_s = dest.to_str().expect("utf-8 path");
    for fsync in [false, true] {
        let mut src = Repeat {
            buf: buf.clone(),
            pos: 0,
            left: len,
        };
        let opts = PutOptions {
            fsync,
            ..PutOptions::default()
        };
        let cpu0 = cpu_seconds(child.id());
        let t = Instant::now();
        c.put_reader(&mut src, dest_s, &opts, Some(len))
            .expect("upload");
        let el = t.elapsed();
        let cpu1 = cpu_seconds(child.id());
        println!(
            "upload {mib} MiB to {} (fsync {fsync}): {:.2} s, {:.0} MB/s; CPU s per GiB: client {:.2}, agent {:.2}",
            dir.display(),
            el.as_secs_f64(),
            len as f64 / el.as_secs_f64() / 1e6,
            (cpu1.0 - cpu0.0) * (1u64 << 30) as f64 / len as f64,
            (cpu1.1 - cpu0.1) * (1u64 << 30) as f64 / len as f64,
        );
    }
    let cpu0 = cpu_seconds(child.id());
    let t = Instant::now();
    c.get_to_writer(dest_s, &mut Sink).expect("download");
    let el = t.elapsed();
    let cpu1 = cpu_seconds(child.id());
    println!(
        "download {mib} MiB: {:.2} s, {:.0} MB/s; CPU s per GiB: client {:.2}, agent {:.2}",
        el.as_secs_f64(),
        len as f64 / el.as_secs_f64() / 1e6,
        (cpu1.0 - cpu0.0) * (1u64 << 30) as f64 / len as f64,
        (cpu1.1 - cpu0.1) * (1u64 << 30) as f64 / len as f64,
    );
    let (l1, l5, _) = loadavg();
    println!(
        "load average during the run: {l1} (1 min), {l5} (5 min) on {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = std::fs::remove_file(&dest);
    let _ = child.kill();
    let _ = child.wait();
}
