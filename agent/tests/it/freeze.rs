//! The freeze and thaw requests as the client meets them: an agent of protocol 3 is not asked
//! (its session stays usable for the fallback), and the real agent's thaw with nothing
//! frozen. No test here sends `freeze` to the real agent: it would freeze the host's own
//! file systems (the agent's unit tests cover freezing with a fake and a loop device).

use crate::common::Agent;
use kiln_agent::message::{ErrorKind, Message};
use kiln_agent::{Client, ClientError};

/// An agent of protocol 3, which knows no freeze: it answers `sync` and fails the test on
/// anything else.
fn protocol3_agent(dir: &std::path::Path) -> std::path::PathBuf {
    crate::common::fake_agent(dir, "v3.sock", 3, |(mut r, mut w)| {
        while let Ok(m) = r.read() {
            assert!(
                matches!(m, Message::Sync),
                "{} reached an agent of protocol 3",
                m.name()
            );
            w.send(&Message::Ack).unwrap();
        }
    })
}

#[test]
fn an_agent_before_protocol_4_is_not_asked_and_its_session_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Client::connect_unix(&protocol3_agent(d.path())).unwrap();
    for (err, request) in [
        (c.freeze().unwrap_err(), "freeze"),
        (c.thaw().unwrap_err(), "thaw"),
    ] {
        assert!(
            matches!(&err, ClientError::Unsupported { request: r, reason } if *r == request && reason.contains("protocol 3")),
            "{err}"
        );
    }
    c.sync().expect("the session is still usable");
}

#[test]
fn a_thaw_with_nothing_frozen_is_refused_and_the_session_goes_on() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    match c.thaw() {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e}");
            assert!(e.message.contains("nothing is frozen"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    c.sync().expect("sync after the refused thaw");
}
