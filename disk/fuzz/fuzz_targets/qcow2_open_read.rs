//! Arbitrary bytes opened as an image (qcow2 or raw) and read, checked and mapped.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_disk::fuzz_entry(data);
});
