//! Arbitrary bytes as guest memory holding a virtio-blk queue (see
//! `kiln_vmm::devices::block::fuzz_entry` for the layout).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_vmm::devices::block::fuzz_entry(data);
});
