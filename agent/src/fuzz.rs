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
