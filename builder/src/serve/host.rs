//! Which `Host` and `Origin` a request may carry. A page on another site can make a browser
//! send requests here (CSRF), and a name of the attacker's that later resolves to 127.0.0.1
//! can make them same-origin (DNS rebinding): the token is the first guard, these checks the
//! second. The editor's own page sends its own origin, or none (same-origin GETs and
//! `EventSource`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("the request has no Host header: open the URL kiln serve printed")]
    NoHost,
    #[error("Host {0:?} is not this editor's address: open the URL kiln serve printed")]
    Host(String),
    #[error("requests from {0:?} are refused: only the editor's own page may call it")]
    Origin(String),
}

/// The addresses the server answers as.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    bound: SocketAddr,
}

impl Allowed {
    pub fn new(bound: SocketAddr) -> Allowed {
        Allowed { bound }
    }

    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), Refused> {
        let host = host.ok_or(Refused::NoHost)?;
        if !self.authority(host) {
            return Err(Refused::Host(host.to_string()));
        }
        match origin {
            None => Ok(()),
            Some(o) => match o.strip_prefix("http://") {
                Some(auth) if self.authority(auth) => Ok(()),
                _ => Err(Refused::Origin(o.to_string())),
            },
        }
    }

    /// `host[:port]` names this server: the port it is bound to, and the address it is bound
    /// to (when that is loopback: also `localhost`, `127.0.0.1` and `[::1]`; when it is every
    /// address: any address literal or `localhost`). A name other than `localhost` never
    /// passes: it is what DNS rebinding uses.
    fn authority(&self, auth: &str) -> bool {
        let Some((host, port)) = split_authority(auth) else {
            return false;
        };
        if port != self.bound.port() {
            return false;
        }
        let bound = self.bound.ip();
        if host.eq_ignore_ascii_case("localhost") {
            return bound.is_loopback() || bound.is_unspecified();
        }
        let Ok(ip) = host.parse::<IpAddr>() else {
            return false;
        };
        ip == bound
            || bound.is_unspecified()
            || (bound.is_loopback()
                && (ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)))
    }
}

/// `host[:port]` or `[v6][:port]` -> (host, port); no port means 80, as browsers write it.
fn split_authority(auth: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match auth.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(bound: &str) -> Allowed {
        Allowed::new(bound.parse().expect("addr"))
    }

    #[test]
    fn loopback_answers_its_own_names_only() {
        let a = allowed("127.0.0.1:7070");
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LocalHost:7070",
            "[::1]:7070",
        ] {
            assert_eq!(a.check(Some(ok), None), Ok(()), "{ok}");
            assert_eq!(a.check(Some(ok), Some(&format!("http://{ok}"))), Ok(()));
        }
        for bad in [
            "evil.example:7070",
            "127.0.0.1:7071",
            "127.0.0.1",
            "127.0.0.2:7070",
            "localhost:",
            "localhost:+7070",
            "[::1]x:7070",
            "127.0.0.1:7070:7070",
            "",
        ] {
            assert_eq!(
                a.check(Some(bad), None),
                Err(Refused::Host(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(a.check(None, None), Err(Refused::NoHost));
        for bad in [
            "null",
            "http://evil.example:7070",
            "https://127.0.0.1:7070",
            "http://127.0.0.1:8080",
        ] {
            assert_eq!(
                a.check(Some("127.0.0.1:7070"), Some(bad)),
                Err(Refused::Origin(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn other_addresses_answer_only_as_themselves() {
        let a = allowed("192.0.2.7:80");
        assert_eq!(a.check(Some("192.0.2.7"), Some("http://192.0.2.7")), Ok(()));
        assert!(a.check(Some("localhost:80"), None).is_err());
        assert!(a.check(Some("127.0.0.1:80"), None).is_err());
        let any = allowed("0.0.0.0:7070");
        assert_eq!(any.check(Some("198.51.100.1:7070"), None), Ok(()));
        assert!(any.check(Some("rebind.example:7070"), None).is_err());
    }
}
