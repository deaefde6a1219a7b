//! The SSH communicator against a real sshd on loopback (no VM): OpenSSH's server run as root
//! from a config, host and client keys in a temp folder, in a mount namespace of its own with
//! a private /run (sshd needs /run/sshd, which the host need not have).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_builder::events::Stream;
use kiln_builder::guest::{Connector, Guest, GuestCommand, GuestError, WaitError};
use kiln_builder::job::StepShell;
use kiln_builder::ssh::{load_key, ExecOptions, Login, SshConnector};

const SSHD: &str = "/usr/sbin/sshd";

/// Why these tests cannot run here, if they cannot.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sshd logs in real users only: run as root".into());
    }
    for tool in [SSHD, "/usr/bin/ssh-keygen", "/usr/bin/unshare"] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing (packages openssh-server, openssh-client, util-linux)"
            ));
        }
    }
    None
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen {}", path.display());
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An sshd on 127.0.0.1, stopped on drop.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Sshd {
    fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("client"));
        keygen(&dir.path().join("other"));
        std::fs::copy(
            dir.path().join("client.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        Sshd::start_in(dir, free_port(), "host")
    }

    fn start_in(dir: tempfile::TempDir, port: u16, host_key: &str) -> Sshd {
        let d = dir.path();
        if !d.join(host_key).exists() {
            keygen(&d.join(host_key));
        }
        let cfg = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {hk}\nPidFile none\n\
             AuthorizedKeysFile {ak}\nPermitRootLogin yes\nUsePAM no\nPasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\nStrictModes no\nSubsystem sftp internal-sftp\n",
            hk = d.join(host_key).display(),
            ak = d.join("authorized_keys").display(),
        );
        std::fs::write(d.join("sshd_config"), cfg).unwrap();
        let log = std::fs::File::create(d.join(format!("sshd-{host_key}.log"))).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o mode=0755 kiln-sshd /run && mkdir -m 0755 /run/sshd && exec {SSHD} -D -e -f {}",
                d.join("sshd_config").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd did not listen: {}",
                std::fs::read_to_string(d.join(format!("sshd-{host_key}.log"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd { dir, port, child }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn login(&self, key: &str) -> Login {
        Login {
            user: "root".into(),
            password: None,
            key: Some(Arc::new(load_key(&self.path().join(key)).unwrap())),
            shell: StepShell::Bash,
        }
    }

    /// Stops this sshd and starts another on the same port with another host key.
    fn restart_with_new_host_key(mut self) -> Sshd {
        self.stop();
        let (dir, port) = (
            std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()),
            self.port,
        );
        Sshd::start_in(dir, port, "host2")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn connector<'a>(
    addr: SocketAddr,
    login: Login,
    seen: Arc<Mutex<Vec<String>>>,
) -> SshConnector<'a> {
    SshConnector::new(
        Box::new(move || Ok(addr)),
        login,
        Box::new(move |fp: &str| seen.lock().unwrap().push(fp.to_string())),
    )
    .unwrap()
}

/// Runs `cmd`, collecting stdout and stderr apart.
fn run(
    g: &mut dyn Guest,
    cmd: GuestCommand,
    timeout: Option<Duration>,
) -> (kiln_builder::guest::ExecOutcome, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = g
        .exec(&cmd, &BTreeMap::new(), timeout, &mut |s, d| match s {
            Stream::Stdout => out.extend_from_slice(d),
            Stream::Stderr => err.extend_from_slice(d),
        })
        .unwrap();
    (
        st,
        String::from_utf8_lossy(&out).into(),
        String::from_utf8_lossy(&err).into(),
    )
}

macro_rules! need_sshd {
    () => {
        if let Some(why) = cannot_run() {
            kiln_e2e::skip(format!("SSH communicator tests: {why}"));
            return;
        }
    };
}

#[test]
fn exec_streams_stdout_and_stderr_apart_with_the_exit_code() {
    need_sshd!();
    let sshd = Sshd::start();
    let seen = Arc::default();
    let c = connector(sshd.addr(), sshd.login("client"), seen);
    let mut g = c.connect(Duration::from_secs(10)).unwrap();
    let (st, out, err) = run(
        &mut *g,
        GuestCommand::Bash("echo out; echo err >&2; exit 3".into()),
        None,
    );
    assert_eq!((st.code, st.timed_out), (Some(3), false), "{st:?}");
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    let (st, out, _) = run(
        &mut *g,
        GuestCommand::Argv(vec!["echo".into(), "it's".into()]),
        None,
    );
    assert!(st.success());
    assert_eq!(out, "it's\n");

    // Output arrives while the command runs, not at its end.
    let start = Instant::now();
    let mut first = None;
    let st = g
        .exec(
            &GuestCommand::Bash("echo a; sleep 2; echo b".into()),
            &BTreeMap::new(),
            None,
            &mut |_, _| {
                first.get_or_insert(start.elapsed());
            },
        )
        .unwrap();
    assert!(st.success());
    let (first, total) = (first.unwrap(), start.elapsed());
    assert!(
        total - first >= Duration::from_millis(1500),
        "first output at {first:?}, end at {total:?}"
    );

    // A script above the inline limit is uploaded and run from a file.
    let big = format!(
        "# {}\necho big",
        "x".repeat(kiln_builder::ssh::shell::INLINE_MAX)
    );
    let (st, out, _) = run(&mut *g, GuestCommand::Bash(big), None);
    assert!(st.success(), "{st:?}");
    assert_eq!(out, "big\n");
}

#[test]
fn exec_has_env_folder_and_stdin() {
    need_sshd!();
    let sshd = Sshd::start();
    let c = connector(sshd.addr(), sshd.login("client"), Arc::default());
    let mut g = c.session(Duration::from_secs(10)).unwrap();
    let dir = sshd.path().display().to_string();
    let opts = ExecOptions {
        env: [("A".to_string(), "x y'z".to_string())].into(),
        cwd: Some(&dir),
        stdin: Some(b"from stdin"),
        timeout: Some(Duration::from_secs(30)),
    };
    let mut out = Vec::new();
    let st = g
        .exec_with(
            &GuestCommand::Bash("pwd; echo \"$A\"; cat".into()),
            &opts,
            &mut |_, d| out.extend_from_slice(d),
        )
        .unwrap();
    assert!(st.success(), "{st:?}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{dir}\nx y'z\nfrom stdin")
    );
    // The trait's env goes the same way.
    let env = [("B".to_string(), "2".to_string())].into();
    let mut out = Vec::new();
    g.exec(
        &GuestCommand::Bash("echo $B".into()),
        &env,
        None,
        &mut |_, d| out.extend_from_slice(d),
    )
    .unwrap();
    assert_eq!(out, b"2\n");
    let bad = [("A-B".to_string(), "1".to_string())].into();
    assert!(g
        .exec(
            &GuestCommand::Bash("true".into()),
            &bad,
            None,
            &mut |_, _| {}
        )
        .is_err());
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[test]
fn a_step_timeout_kills_the_command_and_its_children() {
    need_sshd!();
    let sshd = Sshd::start();
    let c = connector(sshd.addr(), sshd.login("client"), Arc::default());
    let mut g = c.connect(Duration::from_secs(10)).unwrap();
    let pids = sshd.path().join("pids");
    let script = format!(
        "echo $$ > {p}; sleep 60 & echo $! >> {p}; wait",
        p = pids.display()
    );
    let start = Instant::now();
    let (st, _, _) = run(
        &mut *g,
        GuestCommand::Bash(script),
        Some(Duration::from_secs(1)),
    );
    assert!(st.timed_out && !st.success(), "{st:?}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let text = std::fs::read_to_string(&pids).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while text.lines().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in text.lines() {
        assert!(!alive(pid), "process {pid} outlived the step's timeout");
    }
    // The session is still good for the next step.
    let (st, out, _) = run(&mut *g, GuestCommand::Bash("echo next".into()), None);
    assert!(st.success());
    assert_eq!(out, "next\n");
}

#[test]
fn files_go_over_sftp_atomically_with_their_mode() {
    need_sshd!();
    let sshd = Sshd::start();
    let c = connector(sshd.addr(), sshd.login("client"), Arc::default());
    let mut g = c.connect(Duration::from_secs(10)).unwrap();
    let dir = sshd.path().join("a/b");
    let dest = dir.join("f.conf");
    let d = dest.to_str().unwrap();
    g.put_file(d, b"one", 0o640).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"one");
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // Replaced whole, by a rename: the old inode is not written to.
    let before = std::fs::File::open(&dest).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    g.put_file(d, &big, 0o755).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), big);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let mut old = String::new();
    std::io::Read::read_to_string(&mut &before, &mut old).unwrap();
    assert_eq!(old, "one", "the first file was changed in place");
    let names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        names,
        std::slice::from_ref(&dest),
        "no temporary file is left"
    );

    // Read back whole with its mode, bounded, or None.
    assert_eq!(g.read_file(d, 4 << 20).unwrap(), Some((big.clone(), 0o755)));
    let e = g.read_file(d, 1000).unwrap_err().to_string();
    assert!(e.contains("larger than 1000 bytes"), "{e}");
    assert_eq!(
        g.read_file(dir.join("none").to_str().unwrap(), 10).unwrap(),
        None
    );
}

#[test]
fn a_refused_login_fails_at_once_naming_user_and_method() {
    need_sshd!();
    let sshd = Sshd::start();
    let never = AtomicBool::new(false);
    let c = connector(sshd.addr(), sshd.login("other"), Arc::default());
    let start = Instant::now();
    let r = c.connect_until(Duration::from_secs(60), &never, &mut |_| Ok(()));
    let Err(WaitError::Refused(e)) = r else {
        panic!("expected a refusal");
    };
    assert_eq!(
        e.to_string(),
        "SSH: the guest refused public key authentication for `root`"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    let pw = Login {
        user: "root".into(),
        password: Some("not-the-password".into()),
        key: None,
        shell: StepShell::Bash,
    };
    let c = connector(sshd.addr(), pw, Arc::default());
    let start = Instant::now();
    let r = c.connect_until(Duration::from_secs(60), &never, &mut |_| Ok(()));
    let Err(WaitError::Refused(e)) = r else {
        panic!("expected a refusal");
    };
    assert!(matches!(e, GuestError::Refused(_)));
    assert_eq!(
        e.to_string(),
        "SSH: the guest refused password authentication for `root`"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn no_sshd_is_waited_for_until_the_limit() {
    need_sshd!();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let login = Login {
        user: "root".into(),
        password: Some("x".into()),
        key: None,
        shell: StepShell::Bash,
    };
    let c = connector(addr, login, Arc::default());
    let never = AtomicBool::new(false);
    let start = Instant::now();
    let r = c.connect_until(Duration::from_secs(2), &never, &mut |_| Ok(()));
    let Err(WaitError::TimedOut { last, .. }) = r else {
        panic!("expected a timeout");
    };
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    let e = last.to_string();
    assert!(
        e.starts_with(&format!("SSH: connecting to {addr}: ")),
        "{e}"
    );
}

/// The fingerprint `ssh-keygen -l` prints for a public key file.
fn fingerprint(pubkey: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pubkey)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
fn the_host_key_is_recorded_and_a_changed_one_refused() {
    need_sshd!();
    let sshd = Sshd::start();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let c = connector(sshd.addr(), sshd.login("client"), seen.clone());
    drop(c.connect(Duration::from_secs(10)).unwrap());
    drop(c.connect(Duration::from_secs(10)).unwrap());
    let fp = fingerprint(&sshd.path().join("host.pub"));
    assert!(fp.starts_with("SHA256:"), "{fp}");
    assert_eq!(c.host_key(), Some(fp.clone()));
    assert_eq!(
        *seen.lock().unwrap(),
        std::slice::from_ref(&fp),
        "told once, on the first login"
    );

    // Another machine answers at the same address (a guest replaced, or a MITM).
    let sshd = sshd.restart_with_new_host_key();
    let never = AtomicBool::new(false);
    let r = c.connect_until(Duration::from_secs(30), &never, &mut |_| Ok(()));
    let Err(WaitError::Refused(e)) = r else {
        panic!("expected a refusal");
    };
    let now = fingerprint(&sshd.path().join("host2.pub"));
    let e = e.to_string();
    assert!(
        e.contains("host key changed") && e.contains(&fp) && e.contains(&now),
        "{e}"
    );
}
