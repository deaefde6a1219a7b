//! One SSH session with a guest, as a [`Guest`]: commands through `exec` channels with their
//! output streamed, files over one SFTP channel opened on first use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::Handle;
use russh::{ChannelMsg, Sig};
use russh_sftp::client::RawSftpSession;

use super::sftp;
use super::shell::{self, Posix};
use super::{Handler, Login};
use crate::events::Stream;
use crate::guest::{
    CleanupOutcome, CleanupPlan, CleanupReport, ExecOutcome, Guest, GuestCommand, GuestError,
};

/// How long after a step's timeout kiln stops waiting for the guest to kill it itself.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long one SFTP request may take (a slow guest under TCG writing 64 KiB).
const SFTP_REQUEST_SECS: u64 = 60;
/// How long the template cleanup script may take, as the agent's.
const CLEANUP_TIMEOUT: Duration = crate::guest::CLEANUP_TIMEOUT;

/// What [`SshGuest::run`] runs, besides the command.
#[derive(Default)]
pub struct ExecOptions<'a> {
    pub env: BTreeMap<String, String>,
    /// The folder it runs in; the user's home when None.
    pub cwd: Option<&'a str>,
    /// Sent to its standard input, which is then closed (closed at once when None).
    pub stdin: Option<&'a [u8]>,
    pub timeout: Option<Duration>,
}

pub struct SshGuest {
    rt: Arc<tokio::runtime::Runtime>,
    handle: Handle<Handler>,
    login: Login,
    sftp: Option<RawSftpSession>,
    /// Names uploaded scripts and temporary files uniquely within the session.
    seq: u64,
}

fn lost(e: russh::Error) -> GuestError {
    GuestError::Lost(format!("SSH: {e}"))
}

fn file_err(e: sftp::FileError) -> GuestError {
    GuestError::Agent(e.to_string())
}

/// The number of a signal named by an SSH `exit-signal`.
fn signal_number(s: &Sig) -> i32 {
    match s {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 0,
    }
}

impl SshGuest {
    pub(super) fn new(
        rt: Arc<tokio::runtime::Runtime>,
        handle: Handle<Handler>,
        login: Login,
    ) -> Self {
        SshGuest {
            rt,
            handle,
            login,
            sftp: None,
            // Distinct across sessions of one build too (a session after a reboot).
            seq: u64::from(std::process::id()) << 20 | u64::from(rand_u16()),
        }
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn is_root(&self) -> bool {
        self.login.user == "root"
    }

    async fn sftp(&mut self) -> Result<&RawSftpSession, GuestError> {
        if self.sftp.is_none() {
            let ch = self.handle.channel_open_session().await.map_err(lost)?;
            ch.request_subsystem(true, "sftp").await.map_err(lost)?;
            let s = RawSftpSession::new(ch.into_stream());
            s.set_timeout(SFTP_REQUEST_SECS);
            s.init().await.map_err(|e| {
                GuestError::Agent(format!("SSH: the guest has no SFTP server: {e}"))
            })?;
            self.sftp = Some(s);
        }
        self.sftp
            .as_ref()
            .ok_or_else(|| GuestError::Lost("SSH: the SFTP channel is gone".into()))
    }

    /// Runs one command line through the user's login shell; output goes to `out` as it
    /// comes. Past `timeout` (plus a grace for the guest's own kill) the channel is closed
    /// and the outcome says it timed out.
    pub fn run(
        &mut self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Option<Duration>,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError> {
        let rt = self.rt.clone();
        rt.block_on(self.run_async(command, stdin, timeout, out))
    }

    async fn run_async(
        &mut self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Option<Duration>,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError> {
        let start = Instant::now();
        let mut ch = self.handle.channel_open_session().await.map_err(lost)?;
        ch.exec(true, command).await.map_err(lost)?;
        if let Some(d) = stdin {
            ch.data(d).await.map_err(lost)?;
        }
        ch.eof().await.map_err(lost)?;
        let deadline = timeout.map(|t| tokio::time::Instant::from_std(start + t + KILL_GRACE));
        let (mut code, mut signal) = (None, None);
        loop {
            let msg = match deadline {
                Some(d) => match tokio::time::timeout_at(d, ch.wait()).await {
                    Ok(m) => m,
                    Err(_) => {
                        // The guest did not kill it (no `timeout` there): sshd signals the
                        // process it started, and the channel is dropped either way.
                        let _ = ch.signal(Sig::KILL).await;
                        let _ = ch.close().await;
                        return Ok(ExecOutcome {
                            code: None,
                            signal: None,
                            timed_out: true,
                            duration_ms: start.elapsed().as_millis() as u64,
                        });
                    }
                },
                None => ch.wait().await,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => out(Stream::Stdout, &data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => out(Stream::Stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    code = Some(i32::try_from(exit_status).unwrap_or(i32::MAX))
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    signal = Some(signal_number(&signal_name))
                }
                Some(ChannelMsg::Failure) => {
                    return Err(GuestError::Agent(
                        "SSH: the guest's sshd refused to run the command".into(),
                    ))
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            }
        }
        let elapsed = start.elapsed();
        if code.is_none() && signal.is_none() {
            return Err(GuestError::Lost(
                "SSH: the session ended before the command did".into(),
            ));
        }
        Ok(ExecOutcome {
            code,
            signal,
            // Killed by the guest's `timeout` once the time was up.
            timed_out: timeout.is_some_and(|t| elapsed >= t) && code != Some(0),
            duration_ms: elapsed.as_millis() as u64,
        })
    }

    /// Runs a kiln command (a script body or an argv) in the login's shell, with `opts`.
    pub fn exec_with(
        &mut self,
        cmd: &GuestCommand,
        opts: &ExecOptions,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError> {
        if let Some(k) = opts.env.keys().find(|k| !shell::valid_env_name(k)) {
            return Err(GuestError::Agent(format!(
                "environment variable {k:?} is not a valid name for the guest's shell"
            )));
        }
        let sh = self.login.shell;
        let mut uploaded = None;
        let line = if shell::is_posix(sh) {
            let argv = match cmd {
                GuestCommand::Argv(a) => a.clone(),
                GuestCommand::Bash(body) if body.len() <= shell::INLINE_MAX => {
                    shell::posix_script_argv(sh, Some(body), None)
                }
                GuestCommand::Bash(body) => {
                    let path = shell::script_path(sh, self.next());
                    self.put_file(&path, body.as_bytes(), 0o700)?;
                    uploaded = Some(path.clone());
                    shell::posix_script_argv(sh, None, Some(&path))
                }
            };
            shell::posix_command(&Posix {
                argv: &argv,
                env: &opts.env,
                cwd: opts.cwd,
                timeout: opts.timeout,
            })
        } else {
            match cmd {
                GuestCommand::Argv(a) => shell::windows_argv(a),
                GuestCommand::Bash(body) => {
                    let path = shell::script_path(sh, self.next());
                    let text = shell::windows_script(sh, &opts.env, body);
                    self.put_file(&path, text.as_bytes(), 0o700)?;
                    uploaded = Some(path.clone());
                    shell::windows_command(sh, &path)
                }
            }
        };
        let r = self.run(&line, opts.stdin, opts.timeout, out);
        if let Some(p) = uploaded {
            let rt = self.rt.clone();
            rt.block_on(async {
                if let Ok(s) = self.sftp().await {
                    sftp::remove(s, &p).await;
                }
            });
        }
        r
    }

    fn power(&mut self, reboot: bool) -> Result<(), GuestError> {
        let line = shell::power_command(self.login.shell, self.is_root(), reboot);
        let st = self.run(&line, None, Some(Duration::from_secs(30)), &mut |_, _| {})?;
        if !st.success() {
            return Err(GuestError::Agent(format!("SSH: `{line}` failed: {st}")));
        }
        Ok(())
    }
}

/// A little per-process variety for temporary names (not security: the names only need to
/// differ between sessions).
fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() >> 4) as u16
}

impl Guest for SshGuest {
    fn exec(
        &mut self,
        cmd: &GuestCommand,
        env: &BTreeMap<String, String>,
        timeout: Option<Duration>,
        out: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, GuestError> {
        let opts = ExecOptions {
            env: env.clone(),
            timeout,
            ..Default::default()
        };
        self.exec_with(cmd, &opts, out)
    }

    fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError> {
        let n = self.next();
        let rt = self.rt.clone();
        rt.block_on(async {
            let s = self.sftp().await?;
            sftp::put(s, path, data, mode, n).await.map_err(file_err)
        })
    }

    fn read_file(&mut self, path: &str, max: u64) -> Result<Option<(Vec<u8>, u32)>, GuestError> {
        let rt = self.rt.clone();
        rt.block_on(async {
            let s = self.sftp().await?;
            sftp::read(s, path, max).await.map_err(file_err)
        })
    }

    fn reboot(&mut self) -> Result<(), GuestError> {
        self.power(true)
    }

    fn poweroff(&mut self) -> Result<(), GuestError> {
        self.power(false)
    }

    /// The template cleanup script, with `sudo -n` for a user other than root. Windows
    /// guests get none (sysprep is the answer file's business).
    fn cleanup(&mut self, _plan: &CleanupPlan) -> Result<CleanupOutcome, GuestError> {
        if !shell::is_posix(self.login.shell) {
            return Ok(CleanupOutcome::Done(CleanupReport::default()));
        }
        let script = crate::build::shutdown::TEMPLATE_CLEANUP;
        let argv: Vec<String> = if self.is_root() {
            vec!["bash".into(), "-c".into(), script.into()]
        } else {
            vec![
                "sudo".into(),
                "-n".into(),
                "bash".into(),
                "-c".into(),
                script.into(),
            ]
        };
        let line = shell::posix_command(&Posix {
            argv: &argv,
            env: &BTreeMap::new(),
            cwd: None,
            timeout: Some(CLEANUP_TIMEOUT),
        });
        let mut err = Vec::new();
        let st = self.run(&line, None, Some(CLEANUP_TIMEOUT), &mut |s, d| {
            if s == Stream::Stderr && err.len() < 4096 {
                err.extend_from_slice(d)
            }
        })?;
        let mut report = CleanupReport {
            duration_ms: st.duration_ms,
            ..Default::default()
        };
        if !st.success() {
            report.failures.push(format!(
                "the cleanup script over SSH: {st}: {}",
                String::from_utf8_lossy(&err).trim()
            ));
        }
        Ok(CleanupOutcome::Done(report))
    }
}
