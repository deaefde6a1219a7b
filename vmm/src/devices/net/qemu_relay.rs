//! A relay between QEMU and the vhost-user-net backend that hides one ordering quirk.
//!
//! QEMU 7.2's vhost-user netdev sends `SET_VRING_ENABLE` as soon as the guest writes its
//! feature bits, before `SET_FEATURES`. The vhost crate's request handler refuses that as an
//! inactive feature and drops the connection, and QEMU 7.2 crashes outright when the backend
//! does not offer `VHOST_USER_F_PROTOCOL_FEATURES` at all. The relay swallows (and, when
//! asked, acknowledges) a `SET_VRING_ENABLE` that arrives before `SET_FEATURES`; QEMU sends it
//! again once the device starts ("restore vring enable state"), so nothing is lost. Every
//! other message, with its file descriptors, passes unchanged in both directions.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Larger than any message kiln's backend or QEMU exchange (a full memory table is ~16 KiB).
const MAX_BODY: usize = 64 * 1024;
const MAX_FDS: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToBackend,
    ToFrontend,
}

/// Accept frontends on `public` and relay each to the backend listening on `backend`, until
/// `stop` fires.
pub(crate) fn run(listener: UnixListener, backend: PathBuf, stop: Arc<EventFd>) {
    loop {
        match wait(&[listener.as_raw_fd(), stop.as_raw_fd()]) {
            Ok(r) if r[1] => return,
            Ok(r) if r[0] => {}
            Ok(_) => continue,
            Err(e) => {
                warn!("vhost-user-net relay: poll: {e}");
                return;
            }
        }
        let Ok((front, _)) = listener.accept() else {
            continue;
        };
        let back = match UnixStream::connect(&backend) {
            Ok(b) => b,
            Err(e) => {
                warn!("vhost-user-net relay: cannot reach the backend: {e}");
                continue;
            }
        };
        info!("vhost-user-net: frontend connected");
        match relay(&front, &back, &stop) {
            Ok(()) => info!("vhost-user-net: frontend disconnected"),
            Err(e) => warn!("vhost-user-net: connection ended: {e}"),
        }
    }
}

/// What the relay remembers about one connection.
#[derive(Default)]
struct State {
    features_set: bool,
    /// Held-back SET_VRING_ENABLE messages, the last one per ring.
    held: std::collections::BTreeMap<u32, Vec<u8>>,
}

fn relay(front: &UnixStream, back: &UnixStream, stop: &EventFd) -> io::Result<()> {
    let mut state = State::default();
    loop {
        let r = wait(&[front.as_raw_fd(), back.as_raw_fd(), stop.as_raw_fd()])?;
        if r[2] {
            return Ok(());
        }
        if r[0] && !pass(front, back, Dir::ToBackend, &mut state)? {
            return Ok(());
        }
        if r[1] && !pass(back, front, Dir::ToFrontend, &mut state)? {
            return Ok(());
        }
    }
}

/// Move one message from `from` to `to`. Returns false when `from` closed.
fn pass(from: &UnixStream, to: &UnixStream, dir: Dir, state: &mut State) -> io::Result<bool> {
    let mut hdr = [0u8; HDR];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR,
    }];
    // SAFETY: the iovec points at `hdr`, which lives and is writable for the whole call.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut fds) }.map_err(io::Error::other)?;
    // Own the received descriptors so they are closed here once forwarded.
    let files: Vec<File> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in this process; nothing else
        // owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(false);
    }
    let mut reader = from;
    if n < HDR {
        reader.read_exact(&mut hdr[n..])?;
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (req, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_BODY {
        return Err(io::Error::other(format!(
            "vhost-user message {req} claims {size} bytes"
        )));
    }
    let mut body = vec![0u8; size];
    reader.read_exact(&mut body)?;
    if dir == Dir::ToBackend && req == SET_VRING_ENABLE && !state.features_set {
        {
            debug!("vhost-user-net: held back SET_VRING_ENABLE sent before SET_FEATURES");
            if body.len() >= 4 {
                let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                let mut m = Vec::with_capacity(HDR + body.len());
                m.extend_from_slice(&req.to_le_bytes());
                // Replayed without NEED_REPLY: nobody waits for that answer.
                m.extend_from_slice(&(flags & !FLAG_NEED_REPLY).to_le_bytes());
                m.extend_from_slice(&(size as u32).to_le_bytes());
                m.extend_from_slice(&body);
                state.held.insert(index, m);
            }
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = Vec::with_capacity(HDR + 8);
                reply.extend_from_slice(&req.to_le_bytes());
                reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                from.send_with_fds(&[&reply[..]], &[])
                    .map_err(io::Error::other)?;
            }
            return Ok(true);
        }
    }
    let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    to.send_with_fds(&[&hdr[..], &body[..]], &raw)
        .map_err(io::Error::other)?;
    if dir == Dir::ToBackend && req == SET_FEATURES && !state.features_set {
        state.features_set = true;
        // The backend answers SET_FEATURES (if asked) before it reads these, which carry no
        // NEED_REPLY, so QEMU sees exactly the replies it waits for.
        for (_, m) in std::mem::take(&mut state.held) {
            to.send_with_fds(&[&m[..]], &[]).map_err(io::Error::other)?;
        }
    }
    Ok(true)
}

/// poll(2) for readability; one flag per fd (hang-ups count as readable).
fn wait(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a live array of pollfd of the given length.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Where the backend proper listens, next to the public socket.
pub(crate) fn backend_path(public: &Path) -> PathBuf {
    let mut s = public.as_os_str().to_os_string();
    s.push(".backend");
    PathBuf::from(s)
}
