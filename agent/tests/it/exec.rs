//! exec against the real agent binary over a Unix socket.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::common::{is_root, process_gone, wait_until, Agent, Noise};
use kiln_agent::message::ErrorKind;
use kiln_agent::{ClientError, ExecRequest, Interpreter, OutputStream};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::script(Interpreter::Sh, script)
}

#[test]
fn hello_reports_versions_and_guest_facts() {
    let a = Agent::start(&[]);
    let c = a.client();
    let h = c.hello();
    assert_eq!(h.version, kiln_agent::PROTOCOL_VERSION);
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(h.ready, "{}", h.readiness);
    let mut uts = String::new();
    std::fs::File::open("/proc/sys/kernel/osrelease")
        .unwrap()
        .read_to_string(&mut uts)
        .unwrap();
    assert_eq!(h.guest.kernel_release, uts.trim());
    assert_eq!(h.guest.arch, "x86_64");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(h.guest.hostname, hostname.trim());
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let (id, _, _) = kiln_agent::server::parse_os_release(&os);
    assert_eq!(h.guest.distro_id, id);
}

#[test]
fn readiness_follows_ready_when() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("booted");
    let a = Agent::start(&["--ready-when", flag.to_str().unwrap()]);
    let mut c = a.client();
    assert!(!c.hello().ready);
    assert!(
        c.hello().readiness.contains("booted"),
        "{}",
        c.hello().readiness
    );
    let sock = a.sock.clone();
    let f2 = flag.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(f2, b"").unwrap();
    });
    let c2 = kiln_agent::Client::connect_when_ready(
        || kiln_agent::Client::connect_unix(&sock),
        Duration::from_secs(10),
    )
    .expect("ready after the flag file appears");
    assert!(c2.hello().ready);
    t.join().unwrap();
    assert!(c.refresh_hello().unwrap().ready);
}

#[test]
fn readiness_waits_for_the_local_mounts() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("proc/self")).unwrap();
    std::fs::write(
        r.join("etc/fstab"),
        "/dev/vda / ext4 defaults 0 1\n/dev/vdb /srv ext4 defaults 0 2\n",
    )
    .unwrap();
    let root_only = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
    std::fs::write(r.join("proc/self/mountinfo"), root_only).unwrap();
    let a = Agent::start(&["--ready-when-mounted", "--mounts-root", r.to_str().unwrap()]);
    let mut c = a.client();
    assert!(!c.hello().ready);
    assert_eq!(c.hello().readiness, "waiting for /srv to be mounted");
    let mi = r.join("proc/self/mountinfo");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let all = format!("{root_only}40 22 254:16 / /srv rw shared:9 - ext4 /dev/vdb rw\n");
        std::fs::write(mi, all).unwrap();
    });
    let sock = a.sock.clone();
    let c2 = kiln_agent::Client::connect_when_ready(
        || kiln_agent::Client::connect_unix(&sock),
        Duration::from_secs(10),
    )
    .expect("ready once /srv is mounted");
    assert!(c2.hello().ready);
    t.join().unwrap();
    assert!(c.refresh_hello().unwrap().ready);
}

#[test]
fn steps_run_in_a_raised_autogroup() {
    if std::fs::metadata("/proc/self/autogroup").is_err() {
        kiln_e2e::skip("this kernel has no autogroups (/proc/self/autogroup)");
        return;
    }
    if !is_root() {
        kiln_e2e::skip("raising an autogroup needs root (CAP_SYS_NICE)");
        return;
    }
    let a = Agent::start_in_own_session(&["--autogroup-nice", "-4"]);
    let mut c = a.client();
    let group = |c: &mut kiln_agent::Client, user: Option<&str>| {
        let mut req = ExecRequest::argv(["cat", "/proc/self/autogroup"]);
        if let Some(u) = user {
            req = req.user(u);
        }
        let out = c.exec_output(&req).unwrap();
        assert_eq!(out.status.code, Some(0), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // A root step shares the agent's session, so its raised group.
    let root_group = group(&mut c, None);
    assert!(root_group.trim_end().ends_with("nice -4"), "{root_group}");
    let agent_group = std::fs::read_to_string(format!("/proc/{}/autogroup", a.pid())).unwrap();
    assert_eq!(root_group, agent_group);
    // A step as another user has a session, so a group, of its own: raised too.
    let other = group(&mut c, Some("nobody"));
    assert!(other.trim_end().ends_with("nice -4"), "{other}");
    assert_ne!(other, agent_group);
    // The test runner's own group is untouched.
    let ours = std::fs::read_to_string("/proc/self/autogroup").unwrap();
    assert_ne!(ours, agent_group);
}

#[test]
fn large_binary_output_arrives_intact() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let data = a.path("blob");
    let mut expected = vec![0u8; 24 << 20];
    Noise::new(7, expected.len() as u64)
        .read_exact(&mut expected)
        .unwrap();
    // All 256 byte values, NULs and invalid UTF-8 included.
    expected[..256].copy_from_slice(&(0..=255u8).collect::<Vec<_>>());
    std::fs::write(&data, &expected).unwrap();
    let out = c
        .exec_output(&ExecRequest::argv(["cat", data.to_str().unwrap()]))
        .unwrap();
    assert!(out.status.success(), "{}", out.status);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected, "stdout differs from the file");
    assert!(out.stderr.is_empty());
}

#[test]
fn stdout_and_stderr_stay_separate_and_ordered() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
    let out = c.exec_output(&sh(script)).unwrap();
    assert!(out.status.success());
    let want = |p: &str| (0..2000).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want("out"));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), want("err"));

    // Merged: one pipe, so the exact interleaving is kept.
    let out = c.exec_output(&sh(script).merge_stderr(true)).unwrap();
    let both: String = (0..2000).map(|i| format!("out{i}\nerr{i}\n")).collect();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), both);
    assert!(out.stderr.is_empty());

    // Separate streams written apart in time arrive in the order they were produced.
    let mut seq = Vec::new();
    c.exec(
        &sh("for i in 1 2 3 4; do echo o$i; sleep 0.05; echo e$i >&2; sleep 0.05; done"),
        None,
        |s, d| seq.push((s, String::from_utf8_lossy(d).into_owned())),
    )
    .unwrap();
    let got: Vec<String> = seq
        .iter()
        .map(|(s, d)| {
            format!(
                "{}:{}",
                if *s == OutputStream::Stdout { "o" } else { "e" },
                d.trim()
            )
        })
        .collect();
    let want: Vec<String> = (1..=4)
        .flat_map(|i| [format!("o:o{i}"), format!("e:e{i}")])
        .collect();
    assert_eq!(got, want);
}

#[test]
fn output_streams_while_the_command_runs() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let start = Instant::now();
    let mut first = None;
    let mut last = None;
    let st = c
        .exec(&sh("echo early; sleep 1; echo late"), None, |_, _| {
            first.get_or_insert(start.elapsed());
            last = Some(start.elapsed());
        })
        .unwrap();
    assert!(st.success());
    let (first, last) = (first.expect("some output"), last.expect("some output"));
    // Measured against the last chunk, not the clock, so a loaded machine cannot fail it.
    assert!(
        last - first >= Duration::from_millis(800),
        "first chunk at {first:?}, last at {last:?}: output is not streamed"
    );
}

#[test]
fn stdin_is_streamed_while_output_is_read() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    // cat echoes 48 MiB: far more than the pipes and socket buffers hold, so this only
    // finishes if stdin and stdout flow at the same time.
    let len = 48u64 << 20;
    let mut expected = Vec::with_capacity(len as usize);
    Noise::new(99, len).read_to_end(&mut expected).unwrap();
    let mut input = Noise::new(99, len);
    let mut got = Vec::with_capacity(len as usize);
    let mut req = ExecRequest::argv(["cat"]);
    req.stdin = true;
    let st = c
        .exec(&req, Some(&mut input), |s, d| {
            assert_eq!(s, OutputStream::Stdout);
            got.extend_from_slice(d)
        })
        .unwrap();
    assert!(st.success(), "{st}");
    assert!(got == expected, "echoed stdin differs");

    // A command that reads only part of its stdin still ends normally.
    let mut input = Noise::new(1, 8 << 20);
    let out = c
        .exec(
            &ExecRequest::argv(["head", "-c", "10"]),
            Some(&mut input),
            |_, _| {},
        )
        .unwrap();
    assert!(out.success());
    // And the session is still in step afterwards.
    let out = c.exec_output(&ExecRequest::argv(["echo", "next"])).unwrap();
    assert_eq!(out.stdout, b"next\n");
}

#[test]
fn exit_codes_and_signals_are_reported() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let st = c.exec_output(&sh("exit 42")).unwrap().status;
    assert_eq!((st.code, st.signal, st.timed_out), (Some(42), None, false));
    let st = c.exec_output(&sh("kill -TERM $$; sleep 5")).unwrap().status;
    assert_eq!((st.code, st.signal), (None, Some(libc::SIGTERM)));
    let st = c
        .exec_output(&ExecRequest::script(
            Interpreter::Bash,
            "set -e\nfalse\necho unreachable",
        ))
        .unwrap();
    assert_eq!(st.status.code, Some(1));
    assert!(st.stdout.is_empty());
    // env, cwd and a clean base environment
    let out = c
        .exec_output(
            &sh("echo \"$GREETING|$(pwd)|${AGENT_SECRET:-unset}|$PATH\"")
                .env("GREETING", "hello world")
                .cwd("/tmp"),
        )
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.starts_with("hello world|/tmp|unset|/usr/local/sbin:"),
        "{s}"
    );
}

#[test]
fn bad_requests_get_errors_and_the_session_continues() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let e = c
        .exec_output(&ExecRequest::argv(["/no/such/program"]))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::NotFound),
        "{e}"
    );
    let e = c
        .exec_output(&ExecRequest::argv(Vec::<String>::new()))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::InvalidRequest),
        "{e}"
    );
    let e = c
        .exec_output(&ExecRequest::argv(["true"]).user("no-such-user-kiln"))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::UnknownUser),
        "{e}"
    );
    let e = c
        .exec_output(&ExecRequest::argv(["true"]).cwd("/no/such/dir"))
        .unwrap_err();
    assert!(matches!(&e, ClientError::Remote(_)), "{e}");
    assert!(c
        .exec_output(&ExecRequest::argv(["true"]))
        .unwrap()
        .status
        .success());
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let pids = a.path("pids");
    let script = format!(
        "sleep 300 & echo $! > {p}\n( sleep 300 & echo $! >> {p}; wait ) &\nsh -c 'sleep 300' &\necho started\nwait\n",
        p = pids.display()
    );
    let start = Instant::now();
    let out = c
        .exec_output(&sh(&script).timeout(Duration::from_millis(800)))
        .unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(out.stdout, b"started\n");
    let text = std::fs::read_to_string(&pids).unwrap();
    let ids: Vec<u32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{text}");
    for pid in ids {
        assert!(
            wait_until(Duration::from_secs(5), || process_gone(pid)),
            "grandchild {pid} survived the timeout"
        );
    }
}

#[test]
fn commands_run_as_another_user() {
    if !is_root() {
        kiln_e2e::skip("commands_run_as_another_user needs root to switch users");
        return;
    }
    let a = Agent::start(&[]);
    let mut c = a.client();
    let out = c
        .exec_output(&ExecRequest::argv(["id", "-u"]).user("nobody"))
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "65534");
    let out = c
        .exec_output(&ExecRequest::argv(["sh", "-c", "echo $USER $HOME; id -G"]).user("nobody"))
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.starts_with("nobody /nonexistent\n"), "{s}");
    assert!(
        !s.lines().nth(1).unwrap_or("").split(' ').any(|g| g == "0"),
        "kept root's groups: {s}"
    );
}

#[test]
fn a_background_process_holding_the_pipes_does_not_hang_exec() {
    let a = Agent::start(&["--linger-ms", "300"]);
    let mut c = a.client();
    let start = Instant::now();
    let out = c.exec_output(&sh("sleep 30 & echo $!; echo done")).unwrap();
    assert!(out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "exec waited for the background process ({:?})",
        start.elapsed()
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let pid: i32 = lines.next().unwrap().parse().unwrap();
    assert_eq!(lines.next(), Some("done"));
    // It was left running (daemons started by provisioning must survive); clean it up.
    assert!(!process_gone(pid as u32));
    // SAFETY: plain kill of the pid the test just learned.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
