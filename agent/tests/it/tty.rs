//! Commands on a terminal (protocol 3) against the real agent binary: the size, resizing,
//! Ctrl-C reaching the foreground job, the exit code, the login shell.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{process_gone, wait_until, Agent};
use kiln_agent::{ExecRequest, Tty, TtyInput, WindowSize};
use kiln_e2e::screen::wait_for;

/// What the terminal printed so far, shared by the output callback and the feeder.
type Screen = Arc<Mutex<Vec<u8>>>;

fn tty(argv: &[&str], rows: u16, cols: u16) -> ExecRequest {
    ExecRequest::argv(argv.iter().copied()).tty(Tty {
        term: String::new(),
        size: WindowSize { rows, cols },
    })
}

/// Runs `req` with `script` feeding it; returns the exit status and the whole output.
fn run(
    req: &ExecRequest,
    script: impl FnOnce(&mut TtyInput<'_>, &Screen) + Send,
) -> (kiln_agent::ExitStatus, String) {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let screen: Screen = Arc::default();
    let s2 = screen.clone();
    let st = c
        .exec_tty(
            req,
            move |mut input| {
                // A failing step hangs up (the agent then ends the shell) before failing the
                // test, so the test ends instead of waiting for a shell nobody drives.
                let step = std::panic::AssertUnwindSafe(|| script(&mut input, &s2));
                if let Err(p) = std::panic::catch_unwind(step) {
                    input.hang_up();
                    std::panic::resume_unwind(p);
                }
                while !input.done() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            },
            |d| screen.lock().unwrap().extend_from_slice(d),
        )
        .expect("exec on a terminal");
    let out = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    (st, out)
}

#[test]
fn the_command_sees_the_terminal_and_its_size() {
    let (st, out) = run(
        &tty(&["sh", "-c", "stty size; tty; echo TERM=$TERM"], 33, 101),
        |_, _| {},
    );
    assert_eq!(st.code, Some(0), "{out}");
    assert!(out.contains("33 101"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("TERM=xterm-256color"), "{out}");
}

#[test]
fn resize_ctrl_c_and_the_exit_code_reach_an_interactive_shell() {
    let req = tty(&["bash", "--norc", "--noprofile", "-i"], 24, 80);
    let t = Duration::from_secs(20);
    let (st, out) = run(&req, |input, screen| {
        input.write(b"stty size\n").unwrap();
        let at = wait_for(screen, 0, "24 80", t);
        input
            .resize(WindowSize {
                rows: 40,
                cols: 120,
            })
            .unwrap();
        input.write(b"stty size\n").unwrap();
        let at = wait_for(screen, at, "40 120", t);
        // Ctrl-C goes through the terminal to the foreground job, not to the shell.
        // The job says when it runs (then it is the foreground job): `sleep-5` is not in
        // the echo of the typed line.
        input
            .write(b"sh -c 'echo sleep-$((2+3)); exec sleep 100'\n")
            .unwrap();
        let at = wait_for(screen, at, "sleep-5", t);
        let before = Instant::now();
        input.write(&[0x03]).unwrap();
        input.write(b"echo after-$((6*7))\n").unwrap();
        wait_for(screen, at, "after-42", t);
        assert!(before.elapsed() < Duration::from_secs(10));
        input.write(b"exit 3\n").unwrap();
    });
    assert_eq!(st.code, Some(3), "{out}");
}

#[test]
fn no_command_runs_the_login_shell() {
    let (st, out) = run(
        &ExecRequest::login_shell(WindowSize { rows: 24, cols: 80 }),
        |input, screen| {
            input.write(b"echo zero=$0\n").unwrap();
            wait_for(screen, 0, "zero=-", Duration::from_secs(20));
            input.write(b"exit\n").unwrap();
        },
    );
    assert_eq!(st.code, Some(0), "{out}");
}

#[test]
fn a_host_that_goes_away_kills_the_whole_terminal_session() {
    use kiln_agent::frame::{FrameReader, FrameWriter};
    use kiln_agent::message::{Hello, Message};
    use std::os::unix::net::UnixStream;

    let a = Agent::start(&[]);
    let pidfile = a.dir.path().join("job.pid");
    let s = UnixStream::connect(&a.sock).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let mut r = FrameReader::new(s);
    w.send(&Message::Hello(Hello {
        min_version: 3,
        max_version: 3,
        client: "test".into(),
    }))
    .unwrap();
    assert!(matches!(r.read().unwrap(), Message::HelloReply(_)));
    let req = tty(&["bash", "--norc", "--noprofile", "-i"], 24, 80);
    w.send(&Message::Exec(req)).unwrap();
    assert!(matches!(r.read().unwrap(), Message::ExecStarted { .. }));
    // A background job leads a process group of its own under job control: killing the
    // shell's group would miss it.
    let cmd = format!(
        "sleep 300 & echo $! > {}; echo start$((1+1))\n",
        pidfile.display()
    );
    w.send(&Message::StdinData(cmd.into_bytes())).unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("start2") {
        match r.read().unwrap() {
            Message::Stdout(d) => out.extend_from_slice(&d),
            other => panic!("{other:?}"),
        }
    }
    let job: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(job));
    drop(w);
    drop(r);
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(job)),
        "the background job {job} outlived the session"
    );
}
