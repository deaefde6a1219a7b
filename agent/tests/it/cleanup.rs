//! The cleanup request against the real agent binary (every path inside a temporary
//! directory; no TrimAll here: it would trim the host's own file systems), and the client's
//! answer to an agent that predates the request.

use std::os::unix::fs::PermissionsExt;

use crate::common::Agent;
use kiln_agent::message::{CleanupAction, CleanupPlan, ErrorKind, Message, RemoteError};
use kiln_agent::{Client, ClientError};

fn s(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn cleanup_plan_runs_in_the_agent_and_reports_failures() {
    let a = Agent::start(&[]);
    let root = a.path("root");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(root.join("var/log/apt")).unwrap();
    std::fs::write(root.join("etc/machine-id"), "abc\n").unwrap();
    std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "k").unwrap();
    std::fs::write(root.join("etc/ssh/sshd_config"), "c").unwrap();
    std::fs::write(root.join("var/log/apt/history.log"), "h").unwrap();
    let unit = root.join("etc/systemd/system/u.service");
    let link = root.join("etc/systemd/system/multi-user.target.wants/u.service");
    let plan = CleanupPlan {
        actions: vec![
            CleanupAction::Truncate(s(&root.join("etc/machine-id"))),
            CleanupAction::IfExists {
                path: s(&root.join("etc/ssh")),
                then: vec![
                    CleanupAction::Remove(s(&root.join("etc/ssh/ssh_host_*"))),
                    CleanupAction::WriteFile {
                        path: s(&unit),
                        mode: 0o644,
                        data: b"[Unit]\n".to_vec(),
                    },
                    CleanupAction::Symlink {
                        target: s(&unit),
                        link: s(&link),
                    },
                ],
            },
            CleanupAction::EmptyFilesUnder(s(&root.join("var/log"))),
            CleanupAction::Truncate("not/absolute".into()),
            CleanupAction::Sync,
        ],
    };
    let mut c = a.client();
    let r = c.cleanup(&plan).expect("cleanup");
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert!(r.failures[0].contains("not absolute") || r.failures[0].contains("absolute"));
    assert_eq!(std::fs::read(root.join("etc/machine-id")).unwrap(), b"");
    assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists());
    assert!(root.join("etc/ssh/sshd_config").exists());
    assert_eq!(std::fs::read(&unit).unwrap(), b"[Unit]\n");
    assert_eq!(
        std::fs::metadata(&unit).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), unit);
    assert_eq!(
        std::fs::read(root.join("var/log/apt/history.log")).unwrap(),
        b""
    );
    // The session carries on after a cleanup.
    c.sync().expect("sync after cleanup");
}

/// An agent built before the cleanup request existed: it answers an unknown frame type with
/// a protocol error and closes the session (what session.rs did for type 0x0f).
fn old_agent(dir: &std::path::Path) -> std::path::PathBuf {
    crate::common::fake_agent(dir, "old.sock", 1, |(mut r, mut w)| {
        // The old decoder knew no type 0x0f: the error it sent is FrameError's text.
        let e = match r.read_raw() {
            Ok((t, _)) => kiln_agent::frame::FrameError::UnknownType(t),
            Err(e) => e,
        };
        let _ = w.send(&Message::Error(RemoteError::new(
            ErrorKind::Protocol,
            e.to_string(),
        )));
    })
}

#[test]
fn an_older_agent_is_reported_as_unsupported() {
    let d = tempfile::tempdir().unwrap();
    let sock = old_agent(d.path());
    let mut c = Client::connect_unix(&sock).unwrap();
    let err = c
        .cleanup(&CleanupPlan {
            actions: vec![CleanupAction::Sync],
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Unsupported { request: "cleanup", reason } if reason.contains("0x0f")),
        "{err}"
    );
    // The session is over: the client says so instead of writing into a closed stream.
    assert!(matches!(c.sync(), Err(ClientError::Broken)));
}
