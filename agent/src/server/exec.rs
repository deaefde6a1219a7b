//! Running commands: spawn in a new session (so the whole process group can be killed),
//! switch user, stream output as it is produced, enforce the timeout.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::FrameWriter;
use crate::message::{
    ty, Command, ErrorKind, ExecRequest, ExitStatus, Interpreter, Message, RemoteError,
};
use crate::transport::FdStream;

use super::users::{self, UserInfo};
use super::Config;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started command, before its output pump runs.
pub struct Started {
    pub pid: u32,
    /// Where the host's `stdin-data` goes: a pipe, or the terminal's master.
    pub stdin: Option<File>,
    /// The terminal's master, for `resize`, when the command runs on one.
    pub tty: Option<File>,
    pump: Pump,
}

struct Pump {
    child: Child,
    stdout: File,
    stderr: Option<File>,
    script: Option<PathBuf>,
    start: Instant,
    timeout: Option<Duration>,
    linger: Duration,
    /// On a terminal: the command leads a session, and killing it kills the whole session.
    session: bool,
}

/// Kill what a command started: its process group, and on a terminal its whole session
/// (an interactive shell puts each job in a process group of its own).
pub fn kill_all(pid: u32, session: bool) {
    kill_group(pid, libc::SIGKILL);
    if session {
        super::pty::kill_session(pid, libc::SIGKILL);
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

static SCRIPT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Write a script body to a private file the target user can read and run.
fn write_script(
    cfg: &Config,
    interpreter: Interpreter,
    body: &str,
    user: Option<&UserInfo>,
) -> Result<PathBuf, RemoteError> {
    let ext = match interpreter {
        Interpreter::PowerShell => "ps1",
        _ => "sh",
    };
    let n = SCRIPT_SEQ.fetch_add(1, Ordering::Relaxed);
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| RemoteError::from_io(&format!("creating {}", cfg.work_dir.display()), &e))?;
    let path = cfg
        .work_dir
        .join(format!("script-{}-{n}.{ext}", std::process::id()));
    let ctx = format!("writing script {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o500)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| RemoteError::from_io(&ctx, &e))?;
    let written = f.write_all(body.as_bytes()).and_then(|_| {
        if let Some(u) = user {
            std::os::unix::fs::fchown(&f, Some(u.uid), Some(u.gid))?;
        }
        Ok(())
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(RemoteError::from_io(&ctx, &e));
    }
    Ok(path)
}

fn invalid(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidRequest, msg)
}

/// Validate the request, prepare the environment and spawn the command.
pub fn spawn(req: &ExecRequest, cfg: &Config) -> Result<Started, RemoteError> {
    let etc = cfg.etc_dir.as_path();
    let user = match &req.user {
        Some(u) => Some(users::resolve_user(u, etc)?),
        None => None,
    };
    // The environment: a clean base from the account, then the request's variables.
    // SAFETY: getuid cannot fail.
    let my_uid = unsafe { libc::getuid() };
    let account = user.clone().or_else(|| users::user_by_uid(my_uid, etc));
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    if let Some(t) = &req.tty {
        let term = if t.term.is_empty() {
            "xterm-256color"
        } else {
            t.term.as_str()
        };
        env.push(("TERM".into(), term.into()));
    }
    if let Some(a) = &account {
        env.push(("HOME".into(), a.home.clone()));
        env.push(("USER".into(), a.name.clone()));
        env.push(("LOGNAME".into(), a.name.clone()));
        env.push(("SHELL".into(), a.shell.clone()));
    } else {
        env.push(("HOME".into(), "/".into()));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!(
                "environment variable {k:?} has an empty name, or '=' or NUL in it"
            )));
        }
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }

    let login_shell = match (&req.command, &req.tty) {
        (Command::Argv(argv), Some(_)) if argv.is_empty() => Some(
            account
                .as_ref()
                .map(|a| a.shell.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".into()),
        ),
        _ => None,
    };
    let (program, args, script) = match &req.command {
        // A login shell: `-` before its name in argv[0] tells it so.
        Command::Argv(_) if login_shell.is_some() => {
            (login_shell.clone().unwrap_or_default(), Vec::new(), None)
        }
        Command::Argv(argv) => {
            let Some((p, rest)) = argv.split_first() else {
                return Err(invalid("exec: argv is empty"));
            };
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(invalid("exec: an argument contains a NUL byte"));
            }
            (p.clone(), rest.to_vec(), None)
        }
        Command::Script { interpreter, body } => {
            let path = write_script(cfg, *interpreter, body, user.as_ref())?;
            let p = path.display().to_string();
            let (prog, args) = match interpreter {
                Interpreter::Bash => ("bash", vec![p]),
                Interpreter::Sh => ("sh", vec![p]),
                Interpreter::PowerShell => (
                    "pwsh",
                    vec![
                        "-NoLogo".into(),
                        "-NoProfile".into(),
                        "-NonInteractive".into(),
                        "-ExecutionPolicy".into(),
                        "Bypass".into(),
                        "-File".into(),
                        p,
                    ],
                ),
            };
            (prog.to_string(), args, Some(path))
        }
    };
    let cleanup = |e: RemoteError| {
        if let Some(s) = &script {
            let _ = std::fs::remove_file(s);
        }
        e
    };

    let cwd = match &req.cwd {
        Some(c) => PathBuf::from(c),
        None => account
            .as_ref()
            .map(|a| PathBuf::from(&a.home))
            .filter(|h| h.is_dir())
            .unwrap_or_else(|| PathBuf::from("/")),
    };

    let io = match &req.tty {
        Some(t) => terminal_io(t.size),
        None => pipe_io(req),
    }
    .map_err(&cleanup)?;

    // Resolve the program in the command's own PATH here: std then starts it with
    // posix_spawn (a vfork) instead of fork, which is much cheaper where copying page tables
    // is slow (virtualized guests). Switching users still needs fork and a pre_exec hook.
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let mut cmd = std::process::Command::new(resolve_program(&program, path_var));
    let arg0 = match &login_shell {
        Some(sh) => format!("-{}", sh.rsplit('/').next().unwrap_or(sh)),
        None => program.clone(),
    };
    let tty = req.tty.is_some();
    cmd.arg0(&arg0)
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(io.stdin)
        .stdout(io.stdout)
        .stderr(io.stderr);
    match user.as_ref().map(|u| (u.uid, u.gid, u.groups.clone())) {
        // Its own process group: the timeout and a disconnect kill the whole group,
        // grandchildren included.
        None if !tty => {
            cmd.process_group(0);
        }
        ids => {
            // A new session is a new autogroup: raise it like the agent's own.
            let raise = cfg.autogroup_nice.map(super::priority::ChildRaise::new);
            // SAFETY: the closure runs between fork and exec (after std has put the
            // terminal's slave on 0-2); it only makes async-signal-safe syscalls (setsid,
            // ioctl, signal, open/write/close, setgroups, setgid, setuid) on data prepared
            // before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    // A new session also makes it a process group leader (see above).
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The terminal becomes the session's controlling terminal: job
                    // control, and Ctrl-C reaching the foreground job.
                    if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // An agent started with job-control signals ignored (from a script, in
                    // the background) must not pass that on: Ctrl-C has to work.
                    if tty {
                        for sig in [
                            libc::SIGINT,
                            libc::SIGQUIT,
                            libc::SIGHUP,
                            libc::SIGTSTP,
                            libc::SIGTTIN,
                            libc::SIGTTOU,
                        ] {
                            libc::signal(sig, libc::SIG_DFL);
                        }
                    }
                    // Before setuid: a negative nice needs the agent's CAP_SYS_NICE.
                    if let Some(r) = &raise {
                        r.apply();
                    }
                    if let Some((uid, gid, groups)) = &ids {
                        if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                            || libc::setgid(*gid) < 0
                            || libc::setuid(*uid) < 0
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
    }
    let mut spawn_error = None;
    let spawned = super::reaper::spawn_tracked(|| match cmd.spawn() {
        Ok(c) => Some((c.id(), c)),
        Err(e) => {
            spawn_error = Some(e);
            None
        }
    })
    .ok_or_else(|| spawn_error.unwrap_or_else(|| io::Error::other("spawn failed")));
    // The Command holds the write ends of the pipes: drop it so EOF can be seen.
    drop(cmd);
    let mut child = spawned.map_err(|e| {
        let mut r = RemoteError::from_io(&format!("starting {program:?} in {}", cwd.display()), &e);
        if r.kind == ErrorKind::Io {
            r.kind = ErrorKind::Spawn;
        }
        cleanup(r)
    })?;
    let pid = child.id();
    let stdin = match io.master_in {
        Some(m) => Some(m),
        None => child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
    };
    Ok(Started {
        pid,
        stdin,
        tty: io.master_resize,
        pump: Pump {
            child,
            stdout: io.out,
            stderr: io.err,
            script,
            start: Instant::now(),
            timeout: req.timeout,
            linger: cfg.linger,
            session: tty,
        },
    })
}

/// A command's standard streams and the agent's ends of them.
struct StdIo {
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    /// What the pump reads: the stdout pipe, or the terminal's master.
    out: File,
    err: Option<File>,
    /// On a terminal: the master again, for stdin and for resizing.
    master_in: Option<File>,
    master_resize: Option<File>,
}

fn pipe_io(req: &ExecRequest) -> Result<StdIo, RemoteError> {
    let e = |e: io::Error| RemoteError::from_io("pipe", &e);
    let (out_r, out_w) = pipe().map_err(e)?;
    let (err_r, err_w) = if req.merge_stderr {
        (None, out_w.try_clone().map_err(e)?)
    } else {
        let (r, w) = pipe().map_err(e)?;
        (Some(r), w)
    };
    Ok(StdIo {
        stdin: if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        },
        stdout: Stdio::from(out_w),
        stderr: Stdio::from(err_w),
        out: File::from(out_r),
        err: err_r.map(File::from),
        master_in: None,
        master_resize: None,
    })
}

fn terminal_io(size: crate::message::WindowSize) -> Result<StdIo, RemoteError> {
    let e = |e: io::Error| RemoteError::from_io("opening a terminal", &e);
    let (master, slave) = super::pty::open(size).map_err(e)?;
    Ok(StdIo {
        stdin: Stdio::from(slave.try_clone().map_err(e)?),
        stdout: Stdio::from(slave.try_clone().map_err(e)?),
        stderr: Stdio::from(slave),
        master_in: Some(master.try_clone().map_err(e)?),
        master_resize: Some(master.try_clone().map_err(e)?),
        out: master,
        err: None,
    })
}

/// The executable `program` names: itself when it contains a slash, else the first
/// executable file of that name in `path` (else the bare name, and spawning reports it).
fn resolve_program(program: &str, path: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return PathBuf::from(program);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|c| {
            std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Send a signal to the command's whole process group.
pub fn kill_group(pid: u32, sig: i32) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: plain syscall; a negative pid addresses the group the command leads.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Handle to the running pump, for the session thread.
pub struct Running {
    pub pid: u32,
    pub finished: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    session: bool,
}

impl Running {
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Kill the group (unless the command already ended) and wait for the pump.
    pub fn abort(self) {
        if !self.is_finished() {
            kill_all(self.pid, self.session);
        }
        let _ = self.thread.join();
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl Started {
    /// Kill the command (and its group) and reap it: for when the session cannot go on
    /// before the output pump started.
    pub fn abort(mut self) {
        kill_all(self.pid, self.pump.session);
        let _ = self.pump.child.kill();
        let _ = self.pump.child.wait();
        super::reaper::untrack(self.pid);
        if let Some(s) = &self.pump.script {
            let _ = std::fs::remove_file(s);
        }
    }

    /// Start streaming output to `writer`; `sock` is the session's socket, watched for the
    /// peer going away while the session thread may be blocked writing stdin. If no thread
    /// can be started the command is killed and reaped.
    pub fn run(
        self,
        writer: Arc<Mutex<FrameWriter<FdStream>>>,
        sock: FdStream,
        session: u64,
    ) -> io::Result<(Running, Option<File>)> {
        let finished = Arc::new(AtomicBool::new(false));
        let f2 = finished.clone();
        let pid = self.pid;
        let on_tty = self.pump.session;
        // The pump is handed over only once the thread exists, so a failed spawn leaves it
        // here to be killed and reaped.
        let (tx, rx) = mpsc::channel::<Pump>();
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{session}"))
            .spawn(move || {
                if let Ok(pump) = rx.recv() {
                    pump.run(pid, writer, sock, &f2)
                }
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                self.abort();
                return Err(e);
            }
        };
        let Started { stdin, pump, .. } = self;
        if let Err(mpsc::SendError(mut pump)) = tx.send(pump) {
            kill_group(pid, libc::SIGKILL);
            let _ = pump.child.wait();
            super::reaper::untrack(pid);
            return Err(io::Error::other("the exec thread ended before it started"));
        }
        Ok((
            Running {
                pid,
                finished,
                thread,
                session: on_tty,
            },
            stdin,
        ))
    }
}

impl Pump {
    fn run(
        mut self,
        pid: u32,
        writer: Arc<Mutex<FrameWriter<FdStream>>>,
        sock: FdStream,
        finished: &AtomicBool,
    ) {
        let (wake_r, wake_w) = match pipe() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(pid, "no pipe for the exit waiter: {e}; killing the command");
                kill_group(pid, libc::SIGKILL);
                let _ = self.child.wait();
                finished.store(true, Ordering::SeqCst);
                let _ = lock(&writer).send(&Message::Error(RemoteError::from_io("pipe", &e)));
                return;
            }
        };
        let (tx, rx) = mpsc::channel();
        let mut child = self.child;
        let waiter = std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let st = child.wait();
                super::reaper::untrack(pid);
                let _ = tx.send(st);
                let mut w = File::from(wake_w);
                let _ = w.write_all(&[1]);
            });
        let mut status: Option<io::Result<std::process::ExitStatus>> = None;
        let mut exited_at: Option<Instant> = None;
        if let Err(e) = waiter {
            // Without a waiter we cannot see the exit: kill and report it as unknown.
            tracing::error!(pid, "cannot start the exit waiter: {e}");
            kill_group(pid, libc::SIGKILL);
            // Nobody waits for it now: let the PID 1 reaper (if any) take it.
            super::reaper::untrack(pid);
            status = Some(Err(e));
            exited_at = Some(Instant::now());
        }

        let mut out = Some(self.stdout);
        let mut err = self.stderr.take();
        let mut wake = Some(File::from(wake_r));
        let mut peer_gone = false;
        let mut timed_out = false;
        let deadline = self.timeout.map(|t| self.start + t);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if out.is_none() && err.is_none() && status.is_some() {
                break;
            }
            let now = Instant::now();
            if let (Some(d), None) = (deadline, &status) {
                if now >= d && !timed_out {
                    tracing::info!(pid, "timeout reached: killing the process group");
                    kill_group(pid, libc::SIGKILL);
                    timed_out = true;
                }
            }
            // After the command exits, output still in the pipes is read; a background
            // process that keeps them open is not waited for beyond `linger`.
            if let Some(at) = exited_at {
                if now >= at + self.linger {
                    break;
                }
            }
            let mut wait_ms: i64 = -1;
            if let (Some(d), None, false) = (deadline, &status, timed_out) {
                wait_ms = d.saturating_duration_since(now).as_millis() as i64 + 1;
            }
            if let Some(at) = exited_at {
                let l = (at + self.linger)
                    .saturating_duration_since(now)
                    .as_millis() as i64
                    + 1;
                wait_ms = if wait_ms < 0 { l } else { wait_ms.min(l) };
            }
            if timed_out && status.is_none() {
                // The kill was sent; poll again soon in case the waiter has no pipe.
                wait_ms = if wait_ms < 0 { 100 } else { wait_ms.min(100) };
            }
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
            let mut slots: [Option<usize>; 4] = [None; 4];
            for (i, fd) in [
                out.as_ref().map(|f| f.as_raw_fd()),
                err.as_ref().map(|f| f.as_raw_fd()),
                wake.as_ref().map(|f| f.as_raw_fd()),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(fd) = fd {
                    slots[i] = Some(fds.len());
                    fds.push(pollfd(fd, libc::POLLIN));
                }
            }
            if !peer_gone {
                slots[3] = Some(fds.len());
                fds.push(pollfd(sock.as_raw_fd(), libc::POLLRDHUP));
            }
            // SAFETY: fds is a valid array of pollfd of the given length.
            let r = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait_ms.clamp(-1, i32::MAX as i64) as i32,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(pid, "poll failed: {e}; killing the command");
                kill_group(pid, libc::SIGKILL);
                break;
            }
            let revents =
                |slot: Option<usize>| slot.and_then(|i| fds.get(i)).map_or(0, |p| p.revents);
            for (slot, which) in [(slots[0], ty::STDOUT), (slots[1], ty::STDERR)] {
                if revents(slot) == 0 {
                    continue;
                }
                let src = if which == ty::STDOUT {
                    &mut out
                } else {
                    &mut err
                };
                let Some(f) = src.as_mut() else { continue };
                match f.read(&mut buf) {
                    Ok(0) => *src = None,
                    Ok(n) => {
                        if !peer_gone {
                            if let Err(e) = lock(&writer).send_data(which, &buf[..n]) {
                                tracing::info!(pid, "host went away while streaming output ({e}): killing the command");
                                peer_gone = true;
                                kill_all(pid, self.session);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => *src = None,
                }
            }
            if revents(slots[2]) != 0 {
                wake = None;
                if let Ok(st) = rx.recv_timeout(Duration::from_secs(1)) {
                    status = Some(st);
                    exited_at = Some(Instant::now());
                }
            }
            if revents(slots[3]) != 0 && !peer_gone {
                tracing::info!(pid, "host disconnected: killing the process group");
                peer_gone = true;
                kill_all(pid, self.session);
            }
        }
        // The waiter may still be running if we stopped early (poll failure).
        if status.is_none() {
            status = rx.recv_timeout(Duration::from_secs(5)).ok();
        }
        if let Some(s) = &self.script {
            let _ = std::fs::remove_file(s);
        }
        let st = match status {
            Some(Ok(s)) => ExitStatus {
                code: s.code(),
                signal: s.signal(),
                timed_out,
                duration_ms: self.start.elapsed().as_millis() as u64,
            },
            _ => ExitStatus {
                code: None,
                signal: None,
                timed_out,
                duration_ms: self.start.elapsed().as_millis() as u64,
            },
        };
        // Mark finished before the host can see Exited: the next request it sends must find
        // the session idle.
        finished.store(true, Ordering::SeqCst);
        if !peer_gone {
            let _ = lock(&writer).send(&Message::Exited(st));
        }
        tracing::debug!(pid, status = %st, "command finished");
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Lock a mutex, taking the data even if another thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
