//! The gateway's DNS answers: VM names resolve to their addresses inside the VPC; anything
//! else is forwarded upstream (where the VPC has internet) or refused.
//!
//! Hand-written because kiln needs only one thing from DNS: read the single question of a
//! query and write an A answer or an error code. Forwarded queries are relayed byte for byte.

use std::net::Ipv4Addr;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DnsError {
    #[error("DNS message too short ({0} bytes)")]
    Short(usize),
    #[error("not a standard query")]
    NotQuery,
    #[error("DNS query must have exactly one question, has {0}")]
    QuestionCount(u16),
    #[error("bad name in DNS question at byte {0}")]
    BadName(usize),
}

pub(crate) const RCODE_SERVFAIL: u8 = 2;
pub(crate) const RCODE_NXDOMAIN: u8 = 3;
pub(crate) const RCODE_REFUSED: u8 = 5;
pub(crate) const TYPE_A: u16 = 1;

/// The question of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub id: u16,
    /// Lower-case, dot-separated, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question section ends in the message.
    question_end: usize,
}

/// Parse a query with one question (compression is not allowed in questions).
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Short(msg.len()));
    }
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    // QR must be 0 (query) and OPCODE 0 (standard query).
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 {
        return Err(DnsError::NotQuery);
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    if qd != 1 {
        return Err(DnsError::QuestionCount(qd));
    }
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = *msg.get(pos).ok_or(DnsError::BadName(pos))? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 || name.len() + len > 253 {
            return Err(DnsError::BadName(pos));
        }
        let label = msg
            .get(pos + 1..pos + 1 + len)
            .ok_or(DnsError::BadName(pos))?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(DnsError::BadName(pos));
            }
            name.push(b.to_ascii_lowercase() as char);
        }
        pos += 1 + len;
    }
    let tail = msg.get(pos..pos + 4).ok_or(DnsError::Short(msg.len()))?;
    Ok(Query {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        name,
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
        question_end: pos + 4,
    })
}

fn header(msg: &[u8], q: &Query, rcode: u8, answers: u16) -> Vec<u8> {
    let rd = msg.get(2).copied().unwrap_or(0) & 0x01;
    let mut out = Vec::with_capacity(q.question_end + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, AA=1, RD copied, RA=1, RCODE.
    out.push(0x84 | rd);
    out.push(0x80 | (rcode & 0x0f));
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.question_end]);
    out
}

/// An error answer (NXDOMAIN, REFUSED, SERVFAIL) to `msg`.
pub fn error_reply(msg: &[u8], q: &Query, rcode: u8) -> Vec<u8> {
    header(msg, q, rcode, 0)
}

/// An answer to `msg` for a name kiln knows: one A record for A queries, an empty NOERROR
/// answer for other types (the name exists, it has no such record).
pub fn name_reply(msg: &[u8], q: &Query, ip: Ipv4Addr, ttl: u32) -> Vec<u8> {
    if q.qtype != TYPE_A || q.qclass != 1 {
        return header(msg, q, 0, 0);
    }
    let mut out = header(msg, q, 0, 1);
    // Name: a pointer to the question's name at offset 12.
    out.extend_from_slice(&[0xc0, 12]);
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&ip.octets());
    out
}

/// The host's resolvers, from /etc/resolv.conf.
pub(crate) fn host_resolvers() -> Vec<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}

/// A query for `name`, for tests.
#[doc(hidden)]
pub fn query_message(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_answers_a_query() {
        let m = query_message(0x1234, "Web.example", TYPE_A);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.name, "web.example");
        assert_eq!(q.id, 0x1234);
        let r = name_reply(&m, &q, Ipv4Addr::new(10, 0, 0, 5), 60);
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 5]);
        // The reply's question section is the query's.
        assert_eq!(&r[12..m.len()], &m[12..]);
    }

    #[test]
    fn other_types_and_errors() {
        let m = query_message(1, "web", 28);
        let q = parse_query(&m).unwrap();
        let r = name_reply(&m, &q, Ipv4Addr::new(10, 0, 0, 5), 60);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
        let r = error_reply(&m, &q, RCODE_NXDOMAIN);
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
    }

    #[test]
    fn rejects_malformed_queries() {
        assert_eq!(parse_query(&[0; 5]), Err(DnsError::Short(5)));
        let mut m = query_message(1, "web", 1);
        m[2] |= 0x80;
        assert_eq!(parse_query(&m), Err(DnsError::NotQuery));
        let mut m = query_message(1, "web", 1);
        m[5] = 2;
        assert_eq!(parse_query(&m), Err(DnsError::QuestionCount(2)));
        let mut m = query_message(1, "web", 1);
        m[12] = 60; // label runs past the end
        assert!(matches!(parse_query(&m), Err(DnsError::BadName(_))));
        let mut m = query_message(1, "web", 1);
        m[12] = 0xc0; // compression pointer in a question
        assert!(parse_query(&m).is_err());
        let m = query_message(1, "web", 1);
        assert!(parse_query(&m[..m.len() - 2]).is_err());
    }
}
