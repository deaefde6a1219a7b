//! DHCP and DNS messages from arbitrary bytes, as a guest could send them to the gateway.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_net::fuzz::fuzz_gateway_parsers(data);
});
