//! Arbitrary bytes as a guest driving the vsock device's TX and RX queues with packets and
//! raw descriptor chains, and a host program on its Unix sockets (see
//! `kiln_vmm::devices::vsock::fuzz::fuzz_entry`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_vmm::devices::vsock::fuzz::fuzz_entry(data);
});
