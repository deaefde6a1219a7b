//! Test data both sides of a test can make: a pseudo-random stream from a seed.

/// xorshift64 (13, 7, 17): deterministic, without a dependency; only for test data and test
/// choices.
#[derive(Clone, Debug)]
pub struct Xorshift(u64);

impl Xorshift {
    /// Distinct seeds give distinct streams; 0, xorshift's fixed point, is replaced by a constant.
    pub fn new(seed: u64) -> Xorshift {
        Xorshift(if seed == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` eight bytes per step, each step's value little-endian.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `len` bytes of [`Xorshift`] from `seed` made odd, one byte per step from bits 24-31. The
/// static vsock guest program (kiln-vmm's `tests/it/vsock_guest/helper.rs`, built without any
/// crate) makes the same stream on its side.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = Xorshift(seed | 1);
    (0..len).map(|_| (x.next_u64() >> 24) as u8).collect()
}
