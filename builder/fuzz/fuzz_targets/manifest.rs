//! Parser, validator and formatter on arbitrary bytes: `cargo +nightly fuzz run manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_builder::manifest::fuzz_entry(data);
});
