//! Test data both sides of a guest test can make: a pseudo-random byte stream from a seed.

/// `len` bytes of xorshift64 from `seed` (made odd, so no seed gives all zeroes), one byte per
/// step from bits 24-31. The static vsock guest program (kiln-vmm's
/// `tests/vsock_guest/helper.rs`) makes the same stream on its side.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}
