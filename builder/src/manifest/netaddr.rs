//! Address checks for the network section: CIDRs, static IPs, MACs.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Parse `a.b.c.d/n` with the host bits clear.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, (String, Option<String>)> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        (
            format!("`{s}` is not an IPv4 CIDR"),
            Some("write a network such as 10.1.0.0/24".to_string()),
        )
    })?;
    if net.network() != net.addr() {
        return Err((
            format!("`{s}` has host bits set"),
            Some(format!("did you mean `{}`?", net.trunc())),
        ));
    }
    if net.prefix_len() > 30 {
        return Err((
            format!("`{s}` is too small: a subnet needs a gateway and at least one guest"),
            Some("use /30 or wider".to_string()),
        ));
    }
    Ok(net)
}

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Managed subnets put the gateway at the first usable address; unmanaged ones at the
/// second-to-last usable address, leaving the first addresses to the user's own services.
pub fn gateway(net: &Ipv4Net, unmanaged: bool) -> Ipv4Addr {
    if unmanaged {
        Ipv4Addr::from(u32::from(net.broadcast()).saturating_sub(2))
    } else {
        Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
    }
}

/// A MAC in `xx:xx:xx:xx:xx:xx` (or `-` separated) form, normalized to lowercase with colons.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err(format!("`{s}` is not a MAC address (xx:xx:xx:xx:xx:xx)"));
    }
    let mut bytes = [0u8; 6];
    for (b, p) in bytes.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("`{s}` has a non-hex byte `{p}`"))?;
    }
    if bytes[0] & 1 == 1 {
        return Err(format!(
            "`{s}` is a multicast address; a NIC needs a unicast MAC"
        ));
    }
    if bytes == [0; 6] {
        return Err("the all-zero MAC cannot be used".into());
    }
    Ok(format_mac(bytes))
}

pub fn format_mac(b: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

/// A stable, locally administered MAC derived from a name (FNV-1a), so rebuilding the same
/// manifest gives the same addresses.
pub fn derived_mac(key: &str, attempt: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain(attempt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let x = h.to_le_bytes();
    format_mac([0x02, 0x6b, 0x6c, x[0], x[1], x[2]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.0.0.0/24").is_ok());
        assert!(parse_cidr("10.0.0.5/24")
            .unwrap_err()
            .1
            .unwrap()
            .contains("10.0.0.0/24"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0/31").is_err());
        let a: Ipv4Net = "10.0.0.0/16".parse().unwrap();
        let b: Ipv4Net = "10.0.5.0/24".parse().unwrap();
        let c: Ipv4Net = "10.1.0.0/24".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a) && !overlaps(&a, &c));
        let n: Ipv4Net = "192.168.1.0/24".parse().unwrap();
        assert_eq!(gateway(&n, false), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(gateway(&n, true), Ipv4Addr::new(192, 168, 1, 253));
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:AB:cd:01").unwrap(), "52:54:00:ab:cd:01");
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("zz:54:00:ab:cd:01").is_err());
        assert_eq!(derived_mac("m/v/n", 0), derived_mac("m/v/n", 0));
        assert_ne!(derived_mac("m/v/n", 0), derived_mac("m/v/n", 1));
    }
}
