//! Shared helpers: run the real agent binary on a Unix socket in a temporary directory.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::Client;
use kiln_e2e::pattern::Xorshift;

pub const AGENT: &str = env!("CARGO_BIN_EXE_kiln-agent");

pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        Self::start_bin(Path::new(AGENT), extra)
    }

    pub fn start_bin(bin: &Path, extra: &[&str]) -> Agent {
        Self::start_cmd(Command::new(bin), extra)
    }

    /// The agent in a session of its own, as systemd starts it (changes to its session's
    /// autogroup then stay away from the test runner's).
    pub fn start_in_own_session(extra: &[&str]) -> Agent {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(AGENT);
        // SAFETY: setsid(2) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::start_cmd(cmd, extra)
    }

    fn start_cmd(mut cmd: Command, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let work = dir.path().join("work");
        let child = cmd
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--work-dir")
            .arg(&work)
            .args(["--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kiln-agent");
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the agent did not listen on {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, sock }
    }

    pub fn client(&self) -> Client {
        Client::connect_unix(&self.sock).expect("connect to the agent")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Open descriptors and threads of the agent process.
    pub fn fds_and_threads(&self) -> (usize, usize) {
        let count = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        (
            count(format!("/proc/{}/fd", self.pid())),
            count(format!("/proc/{}/task", self.pid())),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes, generated as they are read (never held whole); the
/// byte sequence does not depend on how reads are sized.
pub struct Noise {
    rng: Xorshift,
    word: [u8; 8],
    wpos: usize,
    left: u64,
}

impl Noise {
    pub fn new(seed: u64, len: u64) -> Noise {
        Noise {
            rng: Xorshift::new(seed),
            word: [0; 8],
            wpos: 8,
            left: len,
        }
    }
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        let mut i = 0;
        while i < n {
            if self.wpos == 8 {
                self.word = self.rng.next_u64().to_le_bytes();
                self.wpos = 0;
            }
            let take = (8 - self.wpos).min(n - i);
            buf[i..i + take].copy_from_slice(&self.word[self.wpos..self.wpos + take]);
            i += take;
            self.wpos += take;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Whether a pid is gone (or a zombie nobody reaped yet, which runs no code).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The frame reader and writer of a stand-in agent's one session.
pub type FakeSession = (
    kiln_agent::frame::FrameReader<std::io::BufReader<UnixStream>>,
    kiln_agent::frame::FrameWriter<UnixStream>,
);

/// A stand-in for an older agent at `dir/name`: it answers one session's hello with
/// protocol `version`, then `serve` plays the rest.
pub fn fake_agent(
    dir: &Path,
    name: &str,
    version: u16,
    serve: impl FnOnce(FakeSession) + Send + 'static,
) -> PathBuf {
    use kiln_agent::frame::{FrameReader, FrameWriter};
    use kiln_agent::message::{HelloReply, Message};
    let path = dir.join(name);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = FrameReader::new(std::io::BufReader::new(s.try_clone().unwrap()));
        let mut w = FrameWriter::new(s);
        assert!(matches!(r.read(), Ok(Message::Hello(_))));
        w.send(&Message::HelloReply(HelloReply {
            version,
            agent_version: format!("v{version}"),
            guest: Default::default(),
            ready: true,
            readiness: "ready".into(),
            uptime_ms: 1,
            boot_id: String::new(),
        }))
        .unwrap();
        serve((r, w));
    });
    path
}
