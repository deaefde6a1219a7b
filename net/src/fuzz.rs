//! Entry points for the fuzz targets (and the unit tests that run them on stable).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::config::Ipv4Cidr;
use crate::dhcp::DhcpServer;

/// Feed untrusted bytes to the DHCP server and the DNS parser: must never panic.
pub fn fuzz_gateway_parsers(data: &[u8]) {
    let cidr = Ipv4Cidr {
        addr: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 24,
    };
    let mut s = DhcpServer::new(cidr, Ipv4Addr::new(10, 0, 0, 1), Duration::from_secs(60));
    let mac = [2, 0, 0, 0, 0, 1];
    s.add_client(mac, "vm", None);
    let _ = s.handle(mac, data, Instant::now());
    if let Ok(q) = crate::dns::parse_query(data) {
        let _ = crate::dns::name_reply(data, &q, Ipv4Addr::new(10, 0, 0, 2), 5);
        let _ = crate::dns::error_reply(data, &q, 3);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_entry_survives_random_inputs() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for i in 0..500 {
            let len = (i * 7) % 600;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            // Make some inputs look like real messages so the parsers go deeper.
            if i % 3 == 0 && v.len() > 240 {
                v[236..240].copy_from_slice(&[99, 130, 83, 99]);
                v[0] = 1;
            }
            super::fuzz_gateway_parsers(&v);
        }
    }
}
