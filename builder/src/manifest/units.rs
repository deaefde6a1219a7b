//! Go-style durations (`90s`, `1h30m`) and Kubernetes-style quantities (`4Gi`, `500m`).

use std::time::Duration;

/// Parse a Go duration: one or more `<number><unit>` with units ns, us, µs, ms, s, m, h.
/// `0` alone is allowed, as in Go. Negative durations are refused: nothing here can use them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    let rest = s.strip_prefix('+').unwrap_or(s);
    let mut total: f64 = 0.0;
    let mut chars = rest.char_indices().peekable();
    let mut any = false;
    while chars.peek().is_some() {
        let start = chars.peek().map(|(i, _)| *i).unwrap_or(0);
        let mut end = start;
        while let Some((i, c)) = chars.peek().copied() {
            if c.is_ascii_digit() || c == '.' {
                end = i + c.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let num = &rest[start..end];
        if num.is_empty() || num == "." {
            return Err(format!("expected a number at `{}`", &rest[start..]));
        }
        let value: f64 = num.parse().map_err(|_| format!("bad number `{num}`"))?;
        let ustart = end;
        let mut uend = end;
        while let Some((i, c)) = chars.peek().copied() {
            if c.is_ascii_digit() || c == '.' {
                break;
            }
            uend = i + c.len_utf8();
            chars.next();
        }
        let unit = &rest[ustart..uend];
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit after `{num}` (use s, m or h)")),
            u => return Err(format!("unknown unit `{u}` (use ns, us, ms, s, m or h)")),
        };
        total += value * secs;
        any = true;
    }
    if !any {
        return Err("empty duration".into());
    }
    // Durations beyond 10 years are a typo; bounded so the f64 conversion cannot overflow.
    if !total.is_finite() || total > 315_576_000.0 {
        return Err("duration is too long".into());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Shortest Go-style form of a duration (`1h30m`, `90s` is `1m30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}ns", d.as_nanos());
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 {
        out.push_str(&format!("{sec}s"));
    }
    out
}

/// A Kubernetes quantity as an exact rational `num / den` (den is a power of ten or 1000).
fn parse_quantity(s: &str) -> Result<(u128, u128), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty quantity".into());
    }
    if s.starts_with('-') {
        return Err("a quantity cannot be negative".into());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(format!("`{s}` does not start with a number"));
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if int_part.len() + frac_part.len() > 24 {
        return Err("number is too long".into());
    }
    let digits: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| format!("bad number `{num}`"))?;
    let mut den: u128 = 10u128.pow(frac_part.len() as u32);
    let mult: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "m" => {
            den *= 1000;
            1
        }
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<u32>().ok())
                .filter(|e| *e <= 18);
            match exp {
                Some(e) => 10u128.pow(e),
                None => {
                    let hint = match other.to_ascii_lowercase().as_str() {
                        "gb" | "g" | "gib" => " (did you mean `Gi`?)",
                        "mb" | "mib" => " (did you mean `Mi`?)",
                        "kb" | "kib" => " (did you mean `Ki`?)",
                        "tb" | "tib" => " (did you mean `Ti`?)",
                        _ => "",
                    };
                    return Err(format!(
                        "unknown suffix `{other}`{hint}; use Ki, Mi, Gi, Ti or k, M, G, T"
                    ));
                }
            }
        }
    };
    let num = digits
        .checked_mul(mult)
        .ok_or_else(|| "quantity is too large".to_string())?;
    Ok((num, den))
}

/// A byte quantity: must be a whole number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, den) = parse_quantity(s)?;
    if num % den != 0 {
        return Err(format!("`{s}` is not a whole number of bytes"));
    }
    u64::try_from(num / den).map_err(|_| "quantity is too large".to_string())
}

/// A cpu quantity: guest cores = ceil, minimum 1.
pub fn parse_cpus(s: &str) -> Result<u32, String> {
    let (num, den) = parse_quantity(s)?;
    let cores = num.div_ceil(den).max(1);
    u32::try_from(cores).map_err(|_| "cpu count is too large".to_string())
}

/// `4Gi`-style form of a byte count, exact.
pub fn format_bytes(b: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if b != 0 && b.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", b >> shift);
        }
    }
    b.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert!(parse_duration("3d")
            .unwrap_err()
            .contains("unknown unit `d`"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999h").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1e3").unwrap(), 1000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("500m").is_err());
        assert!(parse_bytes("4GB")
            .unwrap_err()
            .contains("did you mean `Gi`"));
        assert!(parse_bytes("99999999999Ei").is_err());
        assert_eq!(parse_cpus("500m").unwrap(), 1);
        assert_eq!(parse_cpus("1500m").unwrap(), 2);
        assert_eq!(parse_cpus("2").unwrap(), 2);
        assert_eq!(parse_cpus("0").unwrap(), 1);
        assert_eq!(format_bytes(4 << 30), "4Gi");
        assert_eq!(format_bytes(1000), "1000");
    }
}
