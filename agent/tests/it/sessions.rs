//! Many sessions, disconnects, hostile frames, the vsock handshake and power actions.

use crate::common;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{process_gone, wait_until, Agent};
use kiln_agent::frame::{FrameReader, Header, MAX_PAYLOAD};
use kiln_agent::message::{ty, ErrorKind, Message};
use kiln_agent::{Client, ClientError, ExecRequest, Interpreter};

#[test]
fn fifty_concurrent_execs() {
    let a = Agent::start(&[]);
    let start = Instant::now();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let sock = a.sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect_unix(&sock).unwrap();
                let out = c
                    .exec_output(&ExecRequest::script(
                        Interpreter::Sh,
                        format!(
                            "sleep 1; echo session {i}; echo err {i} >&2; exit {}",
                            i % 7
                        ),
                    ))
                    .unwrap();
                assert_eq!(out.stdout, format!("session {i}\n").into_bytes());
                assert_eq!(out.stderr, format!("err {i}\n").into_bytes());
                assert_eq!(out.status.code, Some(i % 7));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Fifty one-second commands in well under fifty seconds: they ran at the same time.
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_client_that_disconnects_mid_command_kills_it_and_leaks_nothing() {
    let mut a = Agent::start(&[]);
    // Warm up so the thread and descriptor counts settle.
    a.client()
        .exec_output(&ExecRequest::argv(["true"]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = a.fds_and_threads();

    for _ in 0..3 {
        let mut c = a.client();
        let mut pids = String::new();
        let sock = a.sock.clone();
        // Read the pids the command prints, then drop the connection from the callback's
        // thread by returning an error: simplest is to run exec on a thread and drop the
        // stream under it.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let t = std::thread::spawn(move || {
            let r = c.exec(
                &ExecRequest::script(
                    Interpreter::Sh,
                    "sleep 300 & echo $! ; (sleep 300 & echo $!; wait) & sleep 300",
                ),
                None,
                |_, d| {
                    let _ = tx.send(String::from_utf8_lossy(d).into_owned());
                },
            );
            drop(sock);
            r
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.lines().count() < 2 && Instant::now() < deadline {
            if let Ok(s) = rx.recv_timeout(Duration::from_millis(100)) {
                pids.push_str(&s);
            }
        }
        let ids: Vec<u32> = pids.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(ids.len(), 2, "{pids:?}");
        // Cut the connection under the client: the agent sees the hang-up.
        kill_client_connections(&a);
        let r = t.join().unwrap();
        assert!(r.is_err(), "exec should fail when its connection is cut");
        for pid in ids {
            assert!(
                wait_until(Duration::from_secs(5), || process_gone(pid)),
                "process {pid} outlived its session"
            );
        }
    }
    assert!(a.alive());
    // The agent serves new sessions, and its descriptors and threads are back where they were.
    assert!(a
        .client()
        .exec_output(&ExecRequest::argv(["true"]))
        .unwrap()
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(5), || a.fds_and_threads() == before),
        "before {before:?}, after {:?}",
        a.fds_and_threads()
    );
}

/// Shut down every connected socket of this test process that points at the agent: the
/// test's own client streams live in this process, so closing their descriptors is the
/// "client vanished" case without killing the test.
fn kill_client_connections(a: &Agent) {
    let agent_inode_peers = std::fs::read_dir("/proc/self/fd").unwrap();
    for e in agent_inode_peers.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Only Unix stream sockets connected to the agent's path.
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: addr/len are valid out-parameters for getpeername.
        let r = unsafe {
            libc::getpeername(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len)
        };
        if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
            continue;
        }
        let path: Vec<u8> = addr
            .sun_path
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        if Path::new(std::str::from_utf8(&path).unwrap_or("")) == a.sock {
            // SAFETY: shutdown on a socket descriptor this process owns.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

fn raw(a: &Agent) -> UnixStream {
    let s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn hello_bytes() -> Vec<u8> {
    let mut body = Vec::new();
    let t = Message::Hello(kiln_agent::message::Hello {
        min_version: 1,
        max_version: 1,
        client: "raw".into(),
    })
    .encode_body(&mut body);
    let mut v = Header::encode(body.len(), t).to_vec();
    v.extend_from_slice(&body);
    v
}

/// Send bytes, then expect a protocol error frame naming `needle` and a closed stream.
fn expect_protocol_error(a: &Agent, greet: bool, bytes: &[u8], needle: &str) {
    let mut s = raw(a);
    let mut r = FrameReader::new(s.try_clone().unwrap());
    if greet {
        s.write_all(&hello_bytes()).unwrap();
        assert!(matches!(r.read().unwrap(), Message::HelloReply(_)));
    }
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    match r.read() {
        Ok(Message::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
    // Then the agent closes the session.
    let mut rest = Vec::new();
    let _ = r.get_ref().try_clone().unwrap().read_to_end(&mut rest);
}

#[test]
fn hostile_frames_end_only_their_session() {
    let mut a = Agent::start(&[]);
    // A healthy session open the whole time.
    let mut good = a.client();

    let huge = Header::encode(MAX_PAYLOAD + 1, ty::EXEC);
    expect_protocol_error(&a, true, &huge, "exceeds the limit");
    let mut max = Header::encode(0, ty::EXEC);
    max[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_protocol_error(&a, true, &max, "exceeds the limit");
    expect_protocol_error(&a, true, &Header::encode(0, 0x7e), "unknown frame type");
    let mut reserved = Header::encode(0, ty::SYNC);
    reserved[6] = 1;
    expect_protocol_error(&a, true, &reserved, "reserved");
    // Truncated: a header promising 100 bytes, then 10 and EOF.
    let mut trunc = Header::encode(100, ty::EXEC).to_vec();
    trunc.extend_from_slice(&[0; 10]);
    expect_protocol_error(&a, true, &trunc, "truncated");
    expect_protocol_error(&a, true, &[1, 2, 3], "truncated");
    // A body that lies about its string length.
    let mut lie = Header::encode(5, ty::GET_FILE).to_vec();
    lie.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, b'/']);
    expect_protocol_error(&a, true, &lie, "remain");
    // An argv list claiming billions of entries.
    let mut list = Header::encode(5, ty::EXEC).to_vec();
    list.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
    expect_protocol_error(&a, true, &list, "exceeds the limit");
    // Requests before hello, and replies sent to the agent.
    expect_protocol_error(
        &a,
        false,
        &Header::encode(0, ty::SYNC),
        "first message must be hello",
    );
    expect_protocol_error(&a, true, &Header::encode(0, ty::ACK), "not a request");
    // File data outside an upload.
    expect_protocol_error(
        &a,
        true,
        &Header::encode(3, ty::FILE_DATA)
            .iter()
            .chain(&[1, 2, 3])
            .copied()
            .collect::<Vec<_>>(),
        "not a request",
    );
    // Random garbage straight away.
    let mut noise = vec![0u8; 4096];
    common::Noise::new(5, 4096).read_exact(&mut noise).unwrap();
    noise[5..8].fill(0);
    let mut s = raw(&a);
    let _ = s.write_all(&noise);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);

    // The agent is alive and the healthy session still works.
    assert!(a.alive());
    let out = good
        .exec_output(&ExecRequest::argv(["echo", "still here"]))
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
    assert!(a.client().hello().ready);
}

#[test]
fn a_version_mismatch_is_refused_clearly() {
    let a = Agent::start(&[]);
    let mut s = raw(&a);
    let mut body = Vec::new();
    let t = Message::Hello(kiln_agent::message::Hello {
        min_version: 7,
        max_version: 9,
        client: "future".into(),
    })
    .encode_body(&mut body);
    s.write_all(&Header::encode(body.len(), t)).unwrap();
    s.write_all(&body).unwrap();
    match FrameReader::new(s).read().unwrap() {
        Message::Error(e) => assert!(e.message.contains("no common protocol version"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hello_speaks_the_newest_common_version() {
    let a = Agent::start(&[]);
    let hello_as = |min, max| {
        let mut s = raw(&a);
        let mut body = Vec::new();
        let t = Message::Hello(kiln_agent::message::Hello {
            min_version: min,
            max_version: max,
            client: "versions".into(),
        })
        .encode_body(&mut body);
        s.write_all(&Header::encode(body.len(), t)).unwrap();
        s.write_all(&body).unwrap();
        match FrameReader::new(s).read().unwrap() {
            Message::HelloReply(r) => r,
            other => panic!("{other:?}"),
        }
    };
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    // A host of protocol 1 gets a version 1 reply, without the boot id it could not decode.
    let v1 = hello_as(1, 1);
    assert_eq!(v1.version, 1);
    assert_eq!(v1.boot_id, "");
    // A host of protocol 2 gets the boot id.
    let v2 = hello_as(1, 2);
    assert_eq!(v2.version, 2);
    assert_eq!(v2.boot_id, boot_id.trim());
    // A host of protocol 3 (terminals) gets version 3.
    let v3 = hello_as(1, 3);
    assert_eq!(v3.version, 3);
    assert_eq!(v3.boot_id, boot_id.trim());
    // This build's client: version 4 (freeze and thaw), with the boot id.
    let v4 = hello_as(1, kiln_agent::PROTOCOL_VERSION);
    assert_eq!(v4.version, 4);
    // A newer host that still speaks 4.
    assert_eq!(hello_as(2, 9).version, 4);
    let c = a.client();
    assert_eq!(c.hello().version, 4);
    assert_eq!(c.hello().boot_id, boot_id.trim());
}

/// A stand-in for the VMM's vsock device socket: answers `CONNECT <port>` and then
/// relays bytes to the agent's Unix socket.
fn fake_vsock_device(dir: &Path, agent_sock: &Path, answer: &'static str) -> std::path::PathBuf {
    let path = dir.join("vsock.sock");
    let l = UnixListener::bind(&path).unwrap();
    let agent_sock = agent_sock.to_path_buf();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut host) = conn else { return };
            let agent_sock = agent_sock.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 1024" {
                    let _ = host.write_all(b"ERR unknown port\n");
                    return;
                }
                if host.write_all(answer.as_bytes()).is_err() || !answer.starts_with("OK") {
                    return;
                }
                let guest = UnixStream::connect(&agent_sock).unwrap();
                let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut h2, &mut g2);
                    let _ = g2.shutdown(std::net::Shutdown::Write);
                });
                let (mut g, mut h) = (guest, host);
                let _ = std::io::copy(&mut g, &mut h);
                let _ = h.shutdown(std::net::Shutdown::Both);
                let _ = t.join();
            });
        }
    });
    path
}

#[test]
fn vsock_unix_socket_handshake() {
    let a = Agent::start(&[]);
    let dev = tempfile::tempdir().unwrap();
    let path = fake_vsock_device(dev.path(), &a.sock, "OK 1073741824\n");
    let mut c =
        Client::connect_vsock_uds(&path, kiln_agent::VSOCK_PORT, Duration::from_secs(5)).unwrap();
    assert!(c.hello().ready);
    let out = c
        .exec_output(&ExecRequest::argv(["echo", "via vsock"]))
        .unwrap();
    assert_eq!(out.stdout, b"via vsock\n");
    // A port nobody listens on is refused with the device's answer in the error.
    let e = Client::connect_vsock_uds(&path, 5, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("ERR unknown port"), "{e}");

    let dev2 = tempfile::tempdir().unwrap();
    let bad = fake_vsock_device(dev2.path(), &a.sock, "NOPE\n");
    let e = Client::connect_vsock_uds(&bad, 1024, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ClientError::Handshake(_)), "{e}");
    // No device at all.
    let e = Client::connect_vsock_uds(&dev2.path().join("none"), 1024, Duration::from_secs(1))
        .unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

#[test]
fn vsock_loopback_when_the_host_has_it() {
    // The agent's real transport, over the kernel's vsock loopback (CID 1), if available.
    let port = 20_000 + std::process::id() % 10_000;
    if let Err(e) = kiln_agent::transport::VsockListener::bind_cid(
        kiln_agent::transport::VMADDR_CID_LOCAL,
        port + 1,
    ) {
        kiln_e2e::skip(format_args!(
            "vsock_loopback_when_the_host_has_it: no vsock loopback here ({e})"
        ));
        return;
    }
    let a = Agent::start(&[
        "--listen",
        &format!("vsock:{port}"),
        "--power-action",
        "disabled",
    ]);
    let stream = (0..100)
        .find_map(|_| {
            kiln_agent::transport::vsock_connect(kiln_agent::transport::VMADDR_CID_LOCAL, port)
                .map_err(|_| std::thread::sleep(Duration::from_millis(50)))
                .ok()
        })
        .expect("connect over vsock loopback");
    let mut c = Client::new(stream).unwrap();
    let out = c
        .exec_output(&ExecRequest::argv(["echo", "vsock"]))
        .unwrap();
    assert_eq!(out.stdout, b"vsock\n");
    drop(a);
}

#[test]
fn power_actions_are_acknowledged_first() {
    // Off vsock the default refuses, so a test agent can never reboot its host.
    let a = Agent::start(&[]);
    let mut c = a.client();
    let e = c.reboot().unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::Unavailable),
        "{e}"
    );
    c.sync().unwrap();

    // In exit mode the agent acknowledges, then goes away.
    let mut a = Agent::start(&["--power-action", "exit"]);
    let mut c = a.client();
    c.poweroff().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !a.alive()),
        "agent still running"
    );
    let e = c.sync().unwrap_err();
    assert!(
        matches!(e, ClientError::Frame(_) | ClientError::Send(_)),
        "{e}"
    );
    let pid = a.pid();
    assert!(process_gone(pid) || !a.alive());

    // The capture's power-off (no service stopped) is refused and acknowledged the same way.
    let a = Agent::start(&[]);
    let e = a.client().poweroff_now().unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::Unavailable),
        "{e}"
    );
    let mut a = Agent::start(&["--power-action", "exit"]);
    a.client().poweroff_now().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !a.alive()),
        "agent still running after poweroff-now"
    );
}

#[test]
fn sessions_beyond_the_limit_are_refused_with_an_error() {
    let a = Agent::start(&["--max-sessions", "2"]);
    // Agent::start's probe connection counts until the agent sees it close: retry.
    let connect = || {
        let mut got = None;
        wait_until(Duration::from_secs(5), || {
            got = Client::connect_unix(&a.sock).ok();
            got.is_some()
        });
        got.expect("a session under the limit")
    };
    let _one = connect();
    let _two = connect();
    let e = Client::connect_unix(&a.sock).unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::Unavailable),
        "{e}"
    );
    drop(_one);
    // The slot frees once the session ends.
    assert!(wait_until(Duration::from_secs(5), || Client::connect_unix(
        &a.sock
    )
    .is_ok()));
}
