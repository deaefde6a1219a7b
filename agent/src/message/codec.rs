//! Body encoding of every message.
//!
//! Bodies are a hand-written little-endian binary encoding: integers are fixed width,
//! strings and byte strings are a `u32` length followed by the bytes, optional values are a
//! `u8` tag (0 absent, 1 present) followed by the value, lists are a `u32` count followed by
//! the items. Every length is checked against the bytes left in the frame before anything is
//! allocated, and a body must be consumed exactly (trailing bytes are an error).

use std::time::Duration;

use super::*;
use crate::frame::FrameError;

impl Message {
    /// Append the body to `out`; returns the frame type.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> u8 {
        let mut e = Enc(out);
        match self {
            Message::Hello(h) => {
                e.u16(h.min_version);
                e.u16(h.max_version);
                e.str(&h.client);
            }
            Message::Exec(x) => {
                match &x.command {
                    Command::Argv(argv) => {
                        e.u8(0);
                        e.list(argv.iter(), |e, s| e.str(s));
                    }
                    Command::Script { interpreter, body } => {
                        e.u8(1);
                        e.u8(interpreter.code());
                        e.str(body);
                    }
                }
                e.list(x.env.iter(), |e, (k, v)| {
                    e.str(k);
                    e.str(v);
                });
                e.opt(x.cwd.as_deref(), |e, s| e.str(s));
                e.opt(x.user.as_deref(), |e, s| e.str(s));
                e.u64(x.timeout.map_or(0, |t| (t.as_millis() as u64).max(1)));
                e.bool(x.stdin);
                e.bool(x.merge_stderr);
                // Only present when asked for, so an exec without a terminal is the same
                // bytes as in protocols 1 and 2 (an older agent refuses one with a terminal:
                // trailing bytes).
                if let Some(t) = &x.tty {
                    e.str(&t.term);
                    e.u16(t.size.rows);
                    e.u16(t.size.cols);
                }
            }
            Message::Resize(w) => {
                e.u16(w.rows);
                e.u16(w.cols);
            }
            Message::StdinData(d)
            | Message::FileData(d)
            | Message::Stdout(d)
            | Message::Stderr(d) => e.0.extend_from_slice(d),
            Message::StdinClose
            | Message::Sync
            | Message::Reboot
            | Message::Poweroff
            | Message::PoweroffNow
            | Message::Freeze
            | Message::Thaw
            | Message::Ack => {}
            Message::Signal(s) => e.i32(*s),
            Message::PutFile(p) => {
                e.str(&p.path);
                e.u32(p.mode);
                e.opt(p.owner.as_deref(), |e, s| e.str(s));
                e.opt(p.size, |e, s| e.u64(s));
                e.bool(p.fsync);
                e.bool(p.create_dirs);
            }
            Message::FileEnd(f) | Message::PutDone(f) => {
                e.u64(f.size);
                e.0.extend_from_slice(&f.sha256);
            }
            Message::GetFile(p) => e.str(p),
            Message::NetConfig(links) => e.list(links.iter(), |e, l| {
                e.0.extend_from_slice(&l.mac);
                e.0.extend_from_slice(&l.address.octets());
                e.u8(l.prefix);
                e.opt(l.gateway, |e, g| e.0.extend_from_slice(&g.octets()));
                e.list(l.dns.iter(), |e, a| e.0.extend_from_slice(&a.octets()));
                e.list(l.search.iter(), |e, s| e.str(s));
                e.u32(l.lease_secs);
            }),
            Message::Stat(s) => {
                e.str(&s.path);
                e.bool(s.follow_symlinks);
            }
            Message::HelloReply(r) => {
                e.u16(r.version);
                e.str(&r.agent_version);
                let g = &r.guest;
                for s in [
                    &g.kernel_release,
                    &g.kernel_version,
                    &g.arch,
                    &g.hostname,
                    &g.distro_id,
                    &g.distro_version,
                    &g.distro_pretty,
                    &g.init,
                ] {
                    e.str(s);
                }
                e.bool(r.ready);
                e.str(&r.readiness);
                e.u64(r.uptime_ms);
                if r.version >= 2 {
                    e.str(&r.boot_id);
                }
            }
            Message::ExecStarted { pid } => e.u32(*pid),
            Message::Exited(x) => {
                e.opt(x.code, |e, c| e.i32(c));
                e.opt(x.signal, |e, s| e.i32(s));
                e.bool(x.timed_out);
                e.u64(x.duration_ms);
            }
            Message::FileHeader(m) => {
                e.u64(m.size);
                e.u32(m.mode);
                e.u32(m.uid);
                e.u32(m.gid);
                e.i64(m.mtime);
            }
            Message::StatReply(s) => e.opt(s.as_ref(), |e, s| {
                e.u8(match s.kind {
                    FileKind::File => 0,
                    FileKind::Dir => 1,
                    FileKind::Symlink => 2,
                    FileKind::Other => 3,
                });
                e.u64(s.size);
                e.u32(s.mode);
                e.u32(s.uid);
                e.u32(s.gid);
                e.i64(s.mtime);
                e.opt(s.link_target.as_deref(), |e, t| e.str(t));
            }),
            Message::Error(r) => {
                e.u16(r.kind.code());
                e.i32(r.errno);
                e.str(&r.message);
            }
            Message::Cleanup(p) => cleanup::encode_plan(&mut e, p),
            Message::CleanupDone(r) => cleanup::encode_report(&mut e, r),
            Message::Frozen(m) | Message::Thawed(m) => e.list(m.iter(), |e, s| e.str(s)),
        }
        self.frame_type()
    }

    /// Decode a frame body of type `t`.
    pub fn decode(t: u8, body: &[u8]) -> Result<Message, FrameError> {
        let kind = type_name(t);
        if kind == "unknown" {
            return Err(FrameError::UnknownType(t));
        }
        let mut d = Dec { buf: body, kind };
        let msg = match t {
            ty::HELLO => Message::Hello(Hello {
                min_version: d.u16()?,
                max_version: d.u16()?,
                client: d.str()?,
            }),
            ty::EXEC => {
                let command = match d.u8()? {
                    0 => {
                        let argv = d.list(|d| d.str())?;
                        Command::Argv(argv)
                    }
                    1 => {
                        let interpreter = match d.u8()? {
                            0 => Interpreter::Bash,
                            1 => Interpreter::Sh,
                            2 => Interpreter::PowerShell,
                            n => return Err(d.bad(format!("unknown interpreter {n}"))),
                        };
                        Command::Script {
                            interpreter,
                            body: d.str()?,
                        }
                    }
                    n => return Err(d.bad(format!("unknown command kind {n}"))),
                };
                let env = d.list(|d| Ok((d.str()?, d.str()?)))?;
                let cwd = d.opt(|d| d.str())?;
                let user = d.opt(|d| d.str())?;
                let timeout = match d.u64()? {
                    0 => None,
                    ms => Some(Duration::from_millis(ms)),
                };
                let stdin = d.bool()?;
                let merge_stderr = d.bool()?;
                let tty = if d.buf.is_empty() {
                    None
                } else {
                    let term = d.str()?;
                    if term.len() > MAX_TERM || term.contains(['\0', '=']) {
                        return Err(d.bad(format!("TERM {term:?} is too long or has NUL or '='")));
                    }
                    Some(Tty {
                        term,
                        size: WindowSize {
                            rows: d.u16()?,
                            cols: d.u16()?,
                        },
                    })
                };
                Message::Exec(ExecRequest {
                    command,
                    env,
                    cwd,
                    user,
                    timeout,
                    stdin,
                    merge_stderr,
                    tty,
                })
            }
            ty::STDIN_DATA => Message::StdinData(d.rest()),
            ty::FILE_DATA => Message::FileData(d.rest()),
            ty::STDOUT => Message::Stdout(d.rest()),
            ty::STDERR => Message::Stderr(d.rest()),
            ty::STDIN_CLOSE => Message::StdinClose,
            ty::SYNC => Message::Sync,
            ty::REBOOT => Message::Reboot,
            ty::POWEROFF => Message::Poweroff,
            ty::POWEROFF_NOW => Message::PoweroffNow,
            ty::ACK => Message::Ack,
            ty::SIGNAL => Message::Signal(d.i32()?),
            ty::RESIZE => Message::Resize(WindowSize {
                rows: d.u16()?,
                cols: d.u16()?,
            }),
            ty::PUT_FILE => Message::PutFile(PutFileRequest {
                path: d.str()?,
                mode: d.u32()?,
                owner: d.opt(|d| d.str())?,
                size: d.opt(|d| d.u64())?,
                fsync: d.bool()?,
                create_dirs: d.bool()?,
            }),
            ty::FILE_END | ty::PUT_DONE => {
                let f = FileEnd {
                    size: d.u64()?,
                    sha256: d.array32()?,
                };
                if t == ty::FILE_END {
                    Message::FileEnd(f)
                } else {
                    Message::PutDone(f)
                }
            }
            ty::GET_FILE => Message::GetFile(d.str()?),
            ty::NET_CONFIG => {
                let links = d.list(|d| {
                    let mac = d.fixed::<6>("MAC address")?;
                    let address = d.fixed::<4>("IPv4 address")?.into();
                    let prefix = d.u8()?;
                    if prefix > 32 {
                        return Err(d.bad(format!("prefix length {prefix} is over 32")));
                    }
                    let gateway = d.opt(|d| Ok(d.fixed::<4>("IPv4 gateway")?.into()))?;
                    let dns = d.list(|d| Ok(d.fixed::<4>("IPv4 DNS server")?.into()))?;
                    let search = d.list(|d| d.str())?;
                    if dns.len() > MAX_NET_NAMES || search.len() > MAX_NET_NAMES {
                        return Err(d.bad(format!(
                            "more than {MAX_NET_NAMES} DNS servers or search domains"
                        )));
                    }
                    Ok(LinkConfig {
                        mac,
                        address,
                        prefix,
                        gateway,
                        dns,
                        search,
                        lease_secs: d.u32()?,
                    })
                })?;
                if links.len() > MAX_NET_LINKS {
                    return Err(d.bad(format!("more than {MAX_NET_LINKS} NICs")));
                }
                Message::NetConfig(links)
            }
            ty::STAT => Message::Stat(StatRequest {
                path: d.str()?,
                follow_symlinks: d.bool()?,
            }),
            ty::HELLO_REPLY => {
                let version = d.u16()?;
                let agent_version = d.str()?;
                let guest = GuestInfo {
                    kernel_release: d.str()?,
                    kernel_version: d.str()?,
                    arch: d.str()?,
                    hostname: d.str()?,
                    distro_id: d.str()?,
                    distro_version: d.str()?,
                    distro_pretty: d.str()?,
                    init: d.str()?,
                };
                Message::HelloReply(HelloReply {
                    version,
                    agent_version,
                    guest,
                    ready: d.bool()?,
                    readiness: d.str()?,
                    uptime_ms: d.u64()?,
                    boot_id: if version >= 2 {
                        d.str()?
                    } else {
                        String::new()
                    },
                })
            }
            ty::EXEC_STARTED => Message::ExecStarted { pid: d.u32()? },
            ty::EXITED => Message::Exited(ExitStatus {
                code: d.opt(|d| d.i32())?,
                signal: d.opt(|d| d.i32())?,
                timed_out: d.bool()?,
                duration_ms: d.u64()?,
            }),
            ty::FILE_HEADER => Message::FileHeader(FileMeta {
                size: d.u64()?,
                mode: d.u32()?,
                uid: d.u32()?,
                gid: d.u32()?,
                mtime: d.i64()?,
            }),
            ty::STAT_REPLY => Message::StatReply(d.opt(|d| {
                let kind = match d.u8()? {
                    0 => FileKind::File,
                    1 => FileKind::Dir,
                    2 => FileKind::Symlink,
                    3 => FileKind::Other,
                    n => return Err(d.bad(format!("unknown file kind {n}"))),
                };
                Ok(FileStat {
                    kind,
                    size: d.u64()?,
                    mode: d.u32()?,
                    uid: d.u32()?,
                    gid: d.u32()?,
                    mtime: d.i64()?,
                    link_target: d.opt(|d| d.str())?,
                })
            })?),
            ty::ERROR => Message::Error(RemoteError {
                kind: ErrorKind::from_code(d.u16()?),
                errno: d.i32()?,
                message: d.str()?,
            }),
            ty::CLEANUP => Message::Cleanup(cleanup::decode_plan(&mut d)?),
            ty::CLEANUP_DONE => Message::CleanupDone(cleanup::decode_report(&mut d)?),
            ty::FREEZE => Message::Freeze,
            ty::THAW => Message::Thaw,
            ty::FROZEN => Message::Frozen(d.list(|d| d.str())?),
            ty::THAWED => Message::Thawed(d.list(|d| d.str())?),
            other => return Err(FrameError::UnknownType(other)),
        };
        if !d.buf.is_empty() {
            return Err(d.bad(format!("{} trailing bytes", d.buf.len())));
        }
        Ok(msg)
    }
}

/// Appends a body's fields to the frame's buffer.
pub(super) struct Enc<'a>(pub(super) &'a mut Vec<u8>);

impl Enc<'_> {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn bool(&mut self, v: bool) {
        self.0.push(v as u8);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    pub(super) fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v)
            }
        }
    }
    pub(super) fn list<I: ExactSizeIterator>(
        &mut self,
        items: I,
        mut f: impl FnMut(&mut Self, I::Item),
    ) {
        self.u32(items.len() as u32);
        for i in items {
            f(self, i)
        }
    }
}

/// Reads a body's fields, checking each length against the bytes left.
pub(super) struct Dec<'a> {
    pub(super) buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Dec<'a> {
    pub(super) fn bad(&self, reason: String) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            reason,
        }
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.bad(format!(
                "{what} needs {n} bytes but only {} remain",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.fixed::<1>("u8")?[0])
    }
    pub(super) fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(self.bad(format!("boolean byte {n} is neither 0 nor 1"))),
        }
    }
    pub(super) fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.fixed("u16")?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.fixed("u32")?))
    }
    pub(super) fn i32(&mut self) -> Result<i32, FrameError> {
        Ok(i32::from_le_bytes(self.fixed("i32")?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.fixed("u64")?))
    }
    pub(super) fn i64(&mut self) -> Result<i64, FrameError> {
        Ok(i64::from_le_bytes(self.fixed("i64")?))
    }
    pub(super) fn array32(&mut self) -> Result<[u8; 32], FrameError> {
        self.fixed("sha256")
    }
    pub(super) fn str(&mut self) -> Result<String, FrameError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len, "string")?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.bad(format!("string is not UTF-8: {e}")))
    }
    pub(super) fn bytes(&mut self) -> Result<Vec<u8>, FrameError> {
        let len = self.u32()? as usize;
        Ok(self.take(len, "byte string")?.to_vec())
    }
    pub(super) fn rest(&mut self) -> Vec<u8> {
        let v = self.buf.to_vec();
        self.buf = &[];
        v
    }
    pub(super) fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(f(self)?)),
            n => Err(self.bad(format!("option tag {n} is neither 0 nor 1"))),
        }
    }
    pub(super) fn list<T>(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<T, FrameError>,
    ) -> Result<Vec<T>, FrameError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST {
            return Err(self.bad(format!("list of {n} items exceeds the limit of {MAX_LIST}")));
        }
        // Every item takes at least 4 bytes, so the remaining body bounds the allocation.
        let mut v = Vec::with_capacity(n.min(self.buf.len() / 4));
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v)
    }
}

#[cfg(test)]
pub(in crate::message) mod tests {
    use super::*;

    pub(in crate::message) fn roundtrip(m: Message) {
        let mut body = Vec::new();
        let t = m.encode_body(&mut body);
        let back = Message::decode(t, &body).expect("decode");
        assert_eq!(back, m);
        // Every strict prefix of a non-empty fixed-shape body must fail, never panic.
        for cut in 0..body.len() {
            let _ = Message::decode(t, &body[..cut]);
        }
    }

    #[test]
    fn every_message_roundtrips() {
        let stat = FileStat {
            kind: FileKind::Symlink,
            size: 12,
            mode: 0o777,
            uid: 1,
            gid: 2,
            mtime: -5,
            link_target: Some("target".into()),
        };
        for m in [
            Message::Hello(Hello {
                min_version: 1,
                max_version: 3,
                client: "test".into(),
            }),
            Message::Exec(
                ExecRequest::argv(["a", "b"])
                    .env("K", "V")
                    .cwd("/tmp")
                    .user("nobody")
                    .timeout(Duration::from_millis(1500)),
            ),
            Message::Exec(ExecRequest::script(
                Interpreter::PowerShell,
                "Write-Host hi",
            )),
            Message::Exec(ExecRequest::login_shell(WindowSize { rows: 24, cols: 80 })),
            Message::Exec(ExecRequest::argv(["top"]).tty(Tty {
                term: "vt100".into(),
                size: WindowSize {
                    rows: 50,
                    cols: 200,
                },
            })),
            Message::Resize(WindowSize {
                rows: 1,
                cols: 65535,
            }),
            Message::StdinData(vec![0, 1, 2, 255]),
            Message::StdinClose,
            Message::Freeze,
            Message::Thaw,
            Message::Frozen(vec!["/boot".into(), "/".into()]),
            Message::Thawed(Vec::new()),
            Message::Signal(15),
            Message::PutFile(PutFileRequest {
                path: "/etc/x".into(),
                mode: 0o600,
                owner: Some("root:adm".into()),
                size: Some(1 << 40),
                fsync: true,
                create_dirs: false,
            }),
            Message::FileData(vec![7; 1000]),
            Message::FileEnd(FileEnd {
                size: 9,
                sha256: [3; 32],
            }),
            Message::GetFile("/etc/hostname".into()),
            Message::Stat(StatRequest {
                path: "/".into(),
                follow_symlinks: true,
            }),
            Message::Sync,
            Message::Reboot,
            Message::Poweroff,
            Message::PoweroffNow,
            Message::NetConfig(vec![
                LinkConfig {
                    mac: [2, 0, 0, 0, 0, 1],
                    address: [10, 0, 2, 15].into(),
                    prefix: 24,
                    gateway: Some([10, 0, 2, 1].into()),
                    dns: vec![[10, 0, 2, 1].into()],
                    search: vec!["lab".into()],
                    lease_secs: 3600,
                },
                LinkConfig {
                    mac: [2, 0, 0, 0, 0, 2],
                    address: [192, 168, 9, 3].into(),
                    prefix: 30,
                    gateway: None,
                    dns: vec![],
                    search: vec![],
                    lease_secs: 0,
                },
            ]),
            Message::HelloReply(HelloReply {
                version: 1,
                agent_version: "0.1.0".into(),
                guest: GuestInfo {
                    hostname: "h".into(),
                    ..Default::default()
                },
                ready: true,
                readiness: "ready".into(),
                uptime_ms: 77,
                boot_id: String::new(),
            }),
            Message::HelloReply(HelloReply {
                version: 2,
                agent_version: "0.2.0".into(),
                guest: GuestInfo::default(),
                ready: false,
                readiness: "waiting".into(),
                uptime_ms: 78,
                boot_id: "5c1b1c3e-7f27-4f25-9d0e-1f0f6b2a9c11".into(),
            }),
            Message::Ack,
            Message::ExecStarted { pid: 42 },
            Message::Stdout(b"out".to_vec()),
            Message::Stderr(vec![]),
            Message::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ms: 5,
            }),
            Message::PutDone(FileEnd {
                size: 1,
                sha256: [0; 32],
            }),
            Message::FileHeader(FileMeta {
                size: 1,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 1,
            }),
            Message::StatReply(Some(stat)),
            Message::StatReply(None),
            Message::Error(RemoteError::new(ErrorKind::Checksum, "bad")),
        ] {
            roundtrip(m);
        }
    }

    #[test]
    fn rejects_trailing_bytes_and_bad_tags() {
        assert!(matches!(
            Message::decode(ty::SYNC, &[0]),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(ty::STAT, &[0, 0, 0, 0, 2]),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            Message::decode(0x7f, &[]),
            Err(FrameError::UnknownType(0x7f))
        ));
    }

    #[test]
    fn net_config_bounds_are_checked() {
        let link = LinkConfig {
            mac: [2, 0, 0, 0, 0, 1],
            address: [10, 0, 2, 15].into(),
            prefix: 24,
            gateway: None,
            dns: vec![],
            search: vec![],
            lease_secs: 60,
        };
        let enc = |m: Message| {
            let mut b = Vec::new();
            let t = m.encode_body(&mut b);
            (t, b)
        };
        let (t, mut body) = enc(Message::NetConfig(vec![link.clone()]));
        // The prefix byte follows the count (4), the MAC (6) and the address (4).
        body[14] = 33;
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("prefix length 33"), "{err}");
        let (t, body) = enc(Message::NetConfig(vec![link.clone(); MAX_NET_LINKS + 1]));
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("NICs"), "{err}");
        let many = LinkConfig {
            search: vec!["a".into(); MAX_NET_NAMES + 1],
            ..link
        };
        let (t, body) = enc(Message::NetConfig(vec![many]));
        let err = Message::decode(t, &body).unwrap_err();
        assert!(err.to_string().contains("search domains"), "{err}");
    }

    #[test]
    fn huge_list_counts_are_refused_before_allocating() {
        // exec, argv kind, count u32::MAX
        let body = [0u8, 0xff, 0xff, 0xff, 0xff];
        let err = Message::decode(ty::EXEC, &body).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // a string claiming 4 GiB
        let body = [0xffu8, 0xff, 0xff, 0xff];
        let err = Message::decode(ty::GET_FILE, &body).unwrap_err();
        assert!(err.to_string().contains("only 0 remain"), "{err}");
    }
}
