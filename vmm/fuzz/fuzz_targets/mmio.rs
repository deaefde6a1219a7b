//! virtio-mmio register traffic from arbitrary bytes (reads and writes at any offset).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_vmm::transport::mmio::fuzz_entry(data);
});
