//! A NIC's MAC address: six bytes, unicast and not all zero, checked once where it is read
//! (the manifest, `base.yaml`), so nothing after re-parses or re-checks it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac([u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a unicast MAC address")]
pub struct MacError(String);

impl Mac {
    /// `bytes` as a NIC's MAC: refused when multicast or all zero.
    pub fn new(bytes: [u8; 6]) -> Result<Mac, MacError> {
        if bytes[0] & 1 == 1 || bytes == [0; 6] {
            return Err(MacError(Mac(bytes).to_string()));
        }
        Ok(Mac(bytes))
    }

    pub fn bytes(self) -> [u8; 6] {
        self.0
    }
}

/// `xx:xx:xx:xx:xx:xx`, hex digits in either case.
impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Mac::new(b).map_err(|_| bad())
    }
}

/// Lowercase `xx:xx:xx:xx:xx:xx`, as the manifest normalizes it.
impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// As its text, the form `base.yaml` has always held.
impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_what_is_no_nic_mac_is_refused() {
        let m: Mac = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.bytes(), [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:1",
            "zz:54:00:ab:cd:01",
        ] {
            let e = bad.parse::<Mac>().unwrap_err().to_string();
            assert!(e.contains("not a unicast MAC"), "{e}");
        }
        let y = serde_saphyr::to_string(&m).unwrap();
        assert_eq!(serde_saphyr::from_str::<Mac>(&y).unwrap(), m);
        assert!(serde_saphyr::from_str::<Mac>("01:00:5e:00:00:01").is_err());
    }
}
