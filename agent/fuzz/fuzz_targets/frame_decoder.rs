#![no_main]
//! Hostile bytes into the agent's frame reader and body decoder.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_agent::fuzz_entry(data);
});
