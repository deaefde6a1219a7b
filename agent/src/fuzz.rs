//! The frame decoder's fuzz entry point, shared by the cargo-fuzz target and a unit test.

use crate::frame::FrameReader;
use crate::message::Message;

/// Decode `data` as a stream of frames and, separately, as one frame body whose type is the
/// first byte. Never panics on any input; every message that decodes must re-encode to a
/// body that decodes to the same message.
pub fn fuzz_entry(data: &[u8]) {
    let mut r = FrameReader::new(data);
    for _ in 0..64 {
        match r.read() {
            Ok(m) => roundtrip(&m),
            Err(_) => break,
        }
    }
    if let Some((&t, body)) = data.split_first() {
        if let Ok(m) = Message::decode(t, body) {
            roundtrip(&m);
        }
    }
}

fn roundtrip(m: &Message) {
    let mut body = Vec::new();
    let t = m.encode_body(&mut body);
    match Message::decode(t, &body) {
        Ok(back) => assert_eq!(&back, m, "re-encoded message decodes differently"),
        Err(e) => panic!("re-encoded {} does not decode: {e}", m.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Header;
    use crate::message::ty;

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Valid cleanup plans with bytes flipped, cut and extended: nested actions and byte
    /// strings are where a decoder goes wrong, and noise rarely reaches them.
    #[test]
    fn fuzz_entry_survives_mutated_cleanup_frames() {
        use crate::message::{CleanupAction, CleanupPlan, CleanupReport};
        let plan = Message::Cleanup(CleanupPlan {
            actions: vec![
                CleanupAction::Truncate("/etc/machine-id".into()),
                CleanupAction::IfExists {
                    path: "/etc/ssh".into(),
                    then: vec![
                        CleanupAction::Remove("/etc/ssh/ssh_host_*".into()),
                        CleanupAction::WriteFile {
                            path: "/etc/u".into(),
                            mode: 0o644,
                            data: b"[Unit]".to_vec(),
                        },
                        CleanupAction::IfExists {
                            path: "/x".into(),
                            then: vec![CleanupAction::Symlink {
                                target: "/a".into(),
                                link: "/b".into(),
                            }],
                        },
                    ],
                },
                CleanupAction::EmptyFilesUnder("/var/log".into()),
                CleanupAction::Sync,
                CleanupAction::TrimAll,
            ],
        });
        let done = Message::CleanupDone(CleanupReport {
            failures: vec!["remove /x: denied".into()],
            trimmed_bytes: 5,
            duration_ms: 6,
        });
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for m in [plan, done] {
            let mut body = Vec::new();
            let t = m.encode_body(&mut body);
            for _ in 0..400 {
                let mut b = body.clone();
                for _ in 0..(1 + rng.next() % 4) {
                    let i = (rng.next() as usize) % b.len();
                    b[i] = match rng.next() % 3 {
                        0 => rng.next() as u8,
                        1 => b[i].wrapping_add(1),
                        _ => b[i].wrapping_sub(1),
                    };
                }
                match rng.next() % 4 {
                    0 => b.truncate((rng.next() as usize) % (b.len() + 1)),
                    1 => b.extend(rng.bytes(3)),
                    _ => {}
                }
                let mut one = vec![t];
                one.extend_from_slice(&b);
                fuzz_entry(&one);
                let mut framed = Header::encode(b.len(), t).to_vec();
                framed.extend_from_slice(&b);
                fuzz_entry(&framed);
            }
        }
    }

    #[test]
    fn fuzz_entry_survives_random_and_mutated_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Pure noise.
        for _ in 0..300 {
            let n = (rng.next() % 300) as usize;
            fuzz_entry(&rng.bytes(n));
        }
        // Valid-looking headers with random bodies for every known type: this reaches the
        // body decoders much more often than noise does.
        let types = [
            ty::HELLO,
            ty::EXEC,
            ty::STDIN_DATA,
            ty::STDIN_CLOSE,
            ty::SIGNAL,
            ty::PUT_FILE,
            ty::FILE_DATA,
            ty::FILE_END,
            ty::GET_FILE,
            ty::STAT,
            ty::SYNC,
            ty::REBOOT,
            ty::POWEROFF,
            ty::POWEROFF_NOW,
            ty::HELLO_REPLY,
            ty::ACK,
            ty::EXEC_STARTED,
            ty::STDOUT,
            ty::STDERR,
            ty::EXITED,
            ty::PUT_DONE,
            ty::FILE_HEADER,
            ty::STAT_REPLY,
            ty::ERROR,
            ty::CLEANUP,
            ty::CLEANUP_DONE,
            ty::FREEZE,
            ty::THAW,
            ty::FROZEN,
            ty::THAWED,
        ];
        for i in 0..600 {
            let t = types[i % types.len()];
            let n = (rng.next() % 64) as usize;
            let mut body = rng.bytes(n);
            // Small values in the first bytes make tags and lengths plausible.
            for b in body.iter_mut().take(8) {
                *b %= 3;
            }
            let mut data = Header::encode(body.len(), t).to_vec();
            data.extend_from_slice(&body);
            fuzz_entry(&data);
            let mut one = vec![t];
            one.extend_from_slice(&body);
            fuzz_entry(&one);
        }
    }
}
