//! Typed reads from the located tree. The structural check already reported wrong types, so
//! these return `None` quietly for anything that is not the expected shape.

use std::time::Duration;

use super::super::units;
use super::super::yaml::{plain_type, Kind, Node, PlainType};

pub fn node<'n>(n: &'n Node, key: &str) -> Option<&'n Node> {
    n.get(key).filter(|v| !matches!(v.kind, Kind::Null))
}

pub fn string(n: &Node, key: &str) -> Option<String> {
    n.get(key)?.as_str().map(str::to_string)
}

pub fn boolean(n: &Node, key: &str) -> Option<bool> {
    match &n.get(key)?.kind {
        Kind::Scalar(s, _) => match plain_type(s) {
            PlainType::Bool(b) => Some(b),
            _ => None,
        },
        _ => None,
    }
}

pub fn int(n: &Node, key: &str) -> Option<i128> {
    match plain_type(n.get(key)?.as_str()?) {
        PlainType::Int(v) => Some(v),
        _ => None,
    }
}

pub fn duration(n: &Node, key: &str) -> Option<Duration> {
    units::parse_duration(n.get(key)?.as_str()?).ok()
}

pub fn bytes(n: &Node, key: &str) -> Option<u64> {
    units::parse_bytes(n.get(key)?.as_str()?).ok()
}

pub fn cpus(n: &Node, key: &str) -> Option<u32> {
    units::parse_cpus(n.get(key)?.as_str()?).ok()
}

pub fn list<'n>(n: &'n Node, key: &str) -> &'n [Node] {
    n.get(key).and_then(Node::as_seq).unwrap_or(&[])
}

/// `^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS label a person probably meant (lowercase, `_` and spaces to `-`).
pub fn label_suggestion(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' => c,
            _ => '-',
        })
        .collect();
    out = out.trim_matches('-').to_string();
    out.truncate(63);
    if out.is_empty() {
        "vm".into()
    } else {
        out
    }
}

pub fn is_http_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

/// `sha256:<64 hex>` or bare 64 hex, normalized to lowercase hex.
pub fn sha256(s: &str) -> Result<String, String> {
    let hex = match s.split_once(':') {
        Some(("sha256", h)) => h,
        Some((algo, _)) => {
            return Err(format!(
                "checksum algorithm `{algo}` is not supported: use sha256"
            ))
        }
        None => s,
    };
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{s}` is not a SHA-256 checksum (sha256: and 64 hex digits)"
        ))
    }
}
