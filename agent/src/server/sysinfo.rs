//! Guest facts for the hello reply: uname, /etc/os-release, PID 1, uptime.

use crate::message::GuestInfo;

fn field(f: &[libc::c_char]) -> String {
    // uname fields are NUL-terminated within their fixed arrays.
    let bytes: Vec<u8> = f
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parse os-release text into (ID, VERSION_ID, PRETTY_NAME).
pub fn parse_os_release(text: &str) -> (String, String, String) {
    let mut id = String::new();
    let mut version = String::new();
    let mut pretty = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => id = v,
            "VERSION_ID" => version = v,
            "PRETTY_NAME" => pretty = v,
            _ => {}
        }
    }
    (id, version, pretty)
}

/// Gather the guest's facts. Missing files give empty strings, never errors.
pub fn guest_info() -> GuestInfo {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    let ok = unsafe { libc::uname(&mut u) } == 0;
    let os = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let (distro_id, distro_version, distro_pretty) = parse_os_release(&os);
    let init = std::fs::read_to_string("/proc/1/comm")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    GuestInfo {
        kernel_release: if ok { field(&u.release) } else { String::new() },
        kernel_version: if ok { field(&u.version) } else { String::new() },
        arch: if ok { field(&u.machine) } else { String::new() },
        hostname: if ok {
            field(&u.nodename)
        } else {
            String::new()
        },
        distro_id,
        distro_version,
        distro_pretty,
        init,
    }
}

/// Milliseconds since boot, from /proc/uptime (0 when unreadable).
/// The kernel's boot id, empty when unreadable.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn os_release_parses() {
        let (id, v, p) = super::parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=x\nVERSION_ID=\"12\"\nID=debian\nbad line\n",
        );
        assert_eq!((id.as_str(), v.as_str()), ("debian", "12"));
        assert_eq!(p, "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn guest_info_reads_this_host() {
        let g = super::guest_info();
        assert!(!g.kernel_release.is_empty());
        assert_eq!(g.arch, std::env::consts::ARCH);
    }
}
