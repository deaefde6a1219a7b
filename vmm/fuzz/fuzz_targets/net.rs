//! virtio-net descriptor chains from arbitrary bytes (tx and rx queues).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_vmm::devices::net::fuzz_entry(data);
});
