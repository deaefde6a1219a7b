//! Body encoding of the template cleanup's plan and report.
//!
//! Kept apart from the other bodies because its checks are its own: actions nest (the decoder
//! recurses, so the depth is bounded) and every path is checked against PATH_MAX and NUL.

use super::codec::{Dec, Enc};
use super::*;
use crate::frame::FrameError;

pub(super) fn encode_plan(e: &mut Enc<'_>, plan: &CleanupPlan) {
    encode_actions(e, &plan.actions)
}

pub(super) fn decode_plan(d: &mut Dec<'_>) -> Result<CleanupPlan, FrameError> {
    Ok(CleanupPlan {
        actions: decode_actions(d, 1)?,
    })
}

pub(super) fn encode_report(e: &mut Enc<'_>, r: &CleanupReport) {
    e.list(r.failures.iter(), |e, s| e.str(s));
    e.u64(r.trimmed_bytes);
    e.u64(r.duration_ms);
}

pub(super) fn decode_report(d: &mut Dec<'_>) -> Result<CleanupReport, FrameError> {
    Ok(CleanupReport {
        failures: d.list(|d| d.str())?,
        trimmed_bytes: d.u64()?,
        duration_ms: d.u64()?,
    })
}

fn encode_actions(e: &mut Enc<'_>, actions: &[CleanupAction]) {
    e.list(actions.iter(), |e, a| match a {
        CleanupAction::Truncate(p) => {
            e.u8(0);
            e.str(p);
        }
        CleanupAction::Remove(p) => {
            e.u8(1);
            e.str(p);
        }
        CleanupAction::EmptyFilesUnder(p) => {
            e.u8(2);
            e.str(p);
        }
        CleanupAction::WriteFile { path, mode, data } => {
            e.u8(3);
            e.str(path);
            e.u32(*mode);
            e.bytes(data);
        }
        CleanupAction::Symlink { target, link } => {
            e.u8(4);
            e.str(target);
            e.str(link);
        }
        CleanupAction::IfExists { path, then } => {
            e.u8(5);
            e.str(path);
            encode_actions(e, then);
        }
        CleanupAction::Sync => e.u8(6),
        CleanupAction::TrimAll => e.u8(7),
    })
}

/// Decode a list of cleanup actions at nesting level `depth` (the plan itself is level 1).
fn decode_actions(d: &mut Dec<'_>, depth: usize) -> Result<Vec<CleanupAction>, FrameError> {
    if depth > MAX_CLEANUP_DEPTH {
        return Err(d.bad(format!(
            "if-exists actions nest deeper than {MAX_CLEANUP_DEPTH} levels"
        )));
    }
    d.list(|d| {
        Ok(match d.u8()? {
            0 => CleanupAction::Truncate(d.path()?),
            1 => CleanupAction::Remove(d.path()?),
            2 => CleanupAction::EmptyFilesUnder(d.path()?),
            3 => {
                let path = d.path()?;
                let mode = d.u32()?;
                if mode & !0o7777 != 0 {
                    return Err(d.bad(format!(
                        "write-file mode {mode:#o} for {path} has bits beyond 0o7777"
                    )));
                }
                CleanupAction::WriteFile {
                    path,
                    mode,
                    data: d.bytes()?,
                }
            }
            4 => CleanupAction::Symlink {
                target: d.path()?,
                link: d.path()?,
            },
            5 => CleanupAction::IfExists {
                path: d.path()?,
                then: decode_actions(d, depth + 1)?,
            },
            6 => CleanupAction::Sync,
            7 => CleanupAction::TrimAll,
            n => return Err(d.bad(format!("unknown cleanup action {n}"))),
        })
    })
}

impl Dec<'_> {
    /// A cleanup path: a string of at most [`MAX_CLEANUP_PATH`] bytes without NUL.
    fn path(&mut self) -> Result<String, FrameError> {
        let s = self.str()?;
        if s.len() > MAX_CLEANUP_PATH {
            return Err(self.bad(format!(
                "a path of {} bytes exceeds the limit of {MAX_CLEANUP_PATH}",
                s.len()
            )));
        }
        if s.contains('\0') {
            return Err(self.bad(format!("path {s:?} contains a NUL byte")));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::tests::roundtrip;
    use super::*;

    fn cleanup_plan_sample() -> CleanupPlan {
        CleanupPlan {
            actions: vec![
                CleanupAction::Truncate("/etc/machine-id".into()),
                CleanupAction::Remove("/tmp/kiln-*".into()),
                CleanupAction::EmptyFilesUnder("/var/log".into()),
                CleanupAction::IfExists {
                    path: "/etc/ssh".into(),
                    then: vec![
                        CleanupAction::WriteFile {
                            path: "/etc/x.service".into(),
                            mode: 0o644,
                            data: vec![0, 1, 255],
                        },
                        CleanupAction::Symlink {
                            target: "/etc/x.service".into(),
                            link: "/etc/wants/x.service".into(),
                        },
                        CleanupAction::IfExists {
                            path: "/a".into(),
                            then: vec![],
                        },
                    ],
                },
                CleanupAction::Sync,
                CleanupAction::TrimAll,
            ],
        }
    }

    #[test]
    fn cleanup_messages_roundtrip() {
        roundtrip(Message::Cleanup(cleanup_plan_sample()));
        roundtrip(Message::Cleanup(CleanupPlan::default()));
        roundtrip(Message::CleanupDone(CleanupReport {
            failures: vec!["remove /x: Permission denied (os error 13)".into()],
            trimmed_bytes: 1 << 33,
            duration_ms: 12,
        }));
        assert_eq!(type_name(ty::CLEANUP), "cleanup");
        assert_eq!(type_name(ty::CLEANUP_DONE), "cleanup-done");
    }

    #[test]
    fn cleanup_decoding_rejects_absurd_input() {
        let enc = |m: Message| {
            let mut b = Vec::new();
            let t = m.encode_body(&mut b);
            (t, b)
        };
        let err_of = |m: Message| {
            let (t, b) = enc(m);
            Message::decode(t, &b).unwrap_err().to_string()
        };
        // Nesting deeper than the limit (the decoder recurses once per level).
        let mut deep = vec![CleanupAction::Sync];
        for _ in 0..MAX_CLEANUP_DEPTH {
            deep = vec![CleanupAction::IfExists {
                path: "/".into(),
                then: deep,
            }];
        }
        let err = err_of(Message::Cleanup(CleanupPlan { actions: deep }));
        assert!(err.contains("nest deeper"), "{err}");
        // One level less is fine.
        let mut ok = vec![CleanupAction::Sync];
        for _ in 1..MAX_CLEANUP_DEPTH {
            ok = vec![CleanupAction::IfExists {
                path: "/".into(),
                then: ok,
            }];
        }
        roundtrip(Message::Cleanup(CleanupPlan { actions: ok }));
        // A path over PATH_MAX, a NUL in a path, a mode with type bits.
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::Remove("/".repeat(MAX_CLEANUP_PATH + 1))],
        }));
        assert!(err.contains("exceeds the limit of 4096"), "{err}");
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::Truncate("/a\0b".into())],
        }));
        assert!(err.contains("NUL"), "{err}");
        let err = err_of(Message::Cleanup(CleanupPlan {
            actions: vec![CleanupAction::WriteFile {
                path: "/f".into(),
                mode: 0o100644,
                data: vec![],
            }],
        }));
        assert!(err.contains("beyond 0o7777"), "{err}");
        // An unknown action tag.
        let err = Message::decode(ty::CLEANUP, &[1, 0, 0, 0, 9])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown cleanup action 9"), "{err}");
        // Counts: over the list cap, and a plausible count with nothing behind it.
        let err = Message::decode(ty::CLEANUP, &[0xff, 0xff, 0xff, 0xff])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
        let err = Message::decode(ty::CLEANUP, &[0x00, 0x10, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("remain"), "{err}");
        // A write-file whose data length claims 4 GiB.
        let mut body = vec![1, 0, 0, 0, 3, 2, 0, 0, 0, b'/', b'f'];
        body.extend_from_slice(&0o644u32.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Message::decode(ty::CLEANUP, &body).unwrap_err().to_string();
        assert!(err.contains("byte string needs 4294967295 bytes"), "{err}");
        // A report with more failure lines than any list may have.
        let err = Message::decode(ty::CLEANUP_DONE, &[0xff, 0xff, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
    }
}
