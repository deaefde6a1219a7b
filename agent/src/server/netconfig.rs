//! `NetConfig`: give the guest's NICs, right away, the addresses kiln's build network has
//! already bound for them as DHCP leases.
//!
//! Why: the agent answers well before the guest's own DHCP client is up (under TCG
//! systemd-networkd starts 20-30 s into a boot and needs seconds more), and build steps need
//! the network. Rather than wait, kiln hands over the lease the guest's DHCP client is going
//! to get anyway, and the agent configures it the way that client would: an address with the
//! lease's lifetime, a default route marked as DHCP's, and the DNS server.
//!
//! Living with the guest's own network stack:
//! - systemd-networkd drops addresses and routes it did not make when it starts managing a
//!   link, unless `KeepConfiguration=dhcp` keeps dynamic ones. The agent adds that setting as
//!   a runtime drop-in (`/run/systemd/network/<file>.network.d/`) for every `.network` file, so
//!   nothing is dropped; networkd's DHCP then gets the same lease and takes the address over.
//!   Everything under `/run` is gone at the next boot: nothing reaches the captured image.
//! - DNS through systemd-resolved: a runtime `resolved.conf.d` drop-in names the server before
//!   resolved starts, and resolved's stub file (what `/etc/resolv.conf` points to) is written
//!   with the server until resolved replaces it.
//! - The agent declines (and kiln waits for the guest's own DHCP instead) when it cannot do
//!   this cleanly: a NIC already has an IPv4 address or is already managed by networkd,
//!   resolved already runs, or `/etc/resolv.conf` names no server and is not resolved's.
//!   Declining happens before anything is changed.
//!
//! Static addresses (`LinkConfig::is_static`: a NIC with an `ip` on a subnet without DHCP)
//! have no DHCP client to fall back on, so they are never declined: the address is permanent,
//! the default route is `proto static`, networkd's drop-in keeps every foreign address
//! (`KeepConfiguration=yes`), a resolved that already runs is told the servers with
//! `resolvectl dns`, and a plain `/etc/resolv.conf` is left as the guest has it (it belongs to
//! the image, which is captured).

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::rtnetlink;
use crate::message::{ErrorKind, LinkConfig, RemoteError};

/// How long a NIC may take to appear (its driver is a module loaded during the boot).
pub const NIC_WAIT: Duration = Duration::from_secs(5);

const DROPIN: &str = "90-kiln-build.conf";

/// What `NetConfig` is about to do.
#[derive(Debug)]
pub struct Plan {
    links: Vec<(LinkConfig, String, u32)>,
    /// Runtime networkd drop-ins to write, with their text.
    files: Vec<(PathBuf, String)>,
    /// Written only if it does not exist yet (resolved's stub, before resolved starts).
    stub: Option<(PathBuf, String)>,
    /// DNS servers for a resolved that already runs (static links), by `resolvectl dns`.
    resolvectl: Vec<Ipv4Addr>,
    /// Why the DNS servers were not configured (static links on a guest kiln cannot tell).
    dns_skipped: Option<String>,
}

fn declined(why: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::Unavailable, why)
}

/// `root` joined with an absolute guest path.
fn at(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// The NIC with `mac` under `<root>/sys/class/net`: its name and index.
fn find_nic(root: &Path, mac: [u8; 6]) -> io::Result<Option<(String, u32)>> {
    let want = mac.map(|b| format!("{b:02x}")).join(":");
    let dir = at(root, "/sys/class/net");
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let p = e.path();
        let Ok(addr) = std::fs::read_to_string(p.join("address")) else {
            continue;
        };
        if addr.trim().eq_ignore_ascii_case(&want) {
            let name = e.file_name().to_string_lossy().into_owned();
            let index = std::fs::read_to_string(p.join("ifindex"))?
                .trim()
                .parse::<u32>()
                .map_err(|x| io::Error::new(io::ErrorKind::InvalidData, x))?;
            return Ok(Some((name, index)));
        }
    }
    Ok(None)
}

/// Whether the interface `name` has an IPv4 address (`SIOCGIFADDR`).
pub fn has_ipv4(name: &str) -> io::Result<bool> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFADDR reads the name from and writes the address into `req`, a valid ifreq.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFADDR as _,
            &mut req,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        e => Err(e),
    }
}

/// The `.network` files systemd-networkd would read (by name: a later directory's file of the
/// same name is shadowed, which does not matter for a drop-in).
fn network_files(root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for d in [
        "/etc/systemd/network",
        "/run/systemd/network",
        "/usr/lib/systemd/network",
        "/lib/systemd/network",
        "/usr/local/lib/systemd/network",
    ] {
        let Ok(rd) = std::fs::read_dir(at(root, d)) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".network") && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort();
    names
}

/// What `/etc/resolv.conf` is: resolved's stub (the path it points to), or a file that names
/// a server already.
enum Resolv {
    Resolved(PathBuf),
    HasServer,
}

fn resolv(root: &Path) -> Result<Resolv, RemoteError> {
    let etc = at(root, "/etc/resolv.conf");
    if let Ok(target) = std::fs::read_link(&etc) {
        let t = target.to_string_lossy();
        if let Some(i) = t.find("run/systemd/resolve/") {
            return Ok(Resolv::Resolved(at(root, &format!("/{}", &t[i..]))));
        }
    }
    match std::fs::read_to_string(&etc) {
        Ok(text)
            if text
                .lines()
                .any(|l| l.trim_start().starts_with("nameserver")) =>
        {
            Ok(Resolv::HasServer)
        }
        Ok(_) => Err(declined(
            "/etc/resolv.conf names no DNS server and is not systemd-resolved's",
        )),
        Err(e) => Err(declined(format!("/etc/resolv.conf: {e}"))),
    }
}

/// Decide what to do, changing nothing yet. `has_ipv4` asks the kernel (tests fake it).
pub fn plan(
    root: &Path,
    links: &[LinkConfig],
    nic_wait: Duration,
    has_ipv4: &dyn Fn(&str) -> io::Result<bool>,
) -> Result<Plan, RemoteError> {
    if links.is_empty() {
        return Err(RemoteError::new(
            ErrorKind::InvalidRequest,
            "no NIC to configure",
        ));
    }
    let mut dns: Vec<Ipv4Addr> = Vec::new();
    let mut search: Vec<String> = Vec::new();
    for l in links {
        for a in &l.dns {
            if !dns.contains(a) {
                dns.push(*a);
            }
        }
        for s in &l.search {
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                && !search.contains(s)
            {
                search.push(s.clone());
            }
        }
    }
    let any_static = links.iter().any(LinkConfig::is_static);
    let mut files = Vec::new();
    let mut stub = None;
    let mut resolvectl = Vec::new();
    let mut dns_skipped = None;
    if !dns.is_empty() {
        let found = match resolv(root) {
            Ok(r) => Some(r),
            // A static address is configured all the same; only DNS is left to the guest.
            Err(e) if any_static => {
                dns_skipped = Some(e.message);
                None
            }
            Err(e) => return Err(e),
        };
        match found {
            None | Some(Resolv::HasServer) => {}
            Some(Resolv::Resolved(stub_path)) => {
                let running = at(root, "/run/systemd/resolve/io.systemd.Resolve").exists();
                if running && !any_static {
                    return Err(declined(
                        "systemd-resolved already runs: its DNS server comes from the guest's DHCP",
                    ));
                }
                let servers: Vec<String> = dns.iter().map(|a| a.to_string()).collect();
                let mut conf = format!(
                    "# kiln build: the build network's DNS until the guest's DHCP client runs\n[Resolve]\nDNS={}\n",
                    servers.join(" ")
                );
                if !search.is_empty() {
                    conf.push_str(&format!("Domains={}\n", search.join(" ")));
                }
                files.push((
                    at(root, &format!("/run/systemd/resolved.conf.d/{DROPIN}")),
                    conf,
                ));
                let mut text = String::from(
                    "# kiln build: until systemd-resolved starts and writes its own\n",
                );
                for s in &servers {
                    text.push_str(&format!("nameserver {s}\n"));
                }
                if !search.is_empty() {
                    text.push_str(&format!("search {}\n", search.join(" ")));
                }
                if running {
                    // The drop-in holds for resolved's next start; this for the running one.
                    resolvectl = dns.clone();
                } else {
                    stub = Some((stub_path, text));
                }
            }
        }
    }
    let start = Instant::now();
    let mut found = Vec::new();
    for l in links {
        let mac = l.mac.map(|b| format!("{b:02x}")).join(":");
        let (name, index) = loop {
            match find_nic(root, l.mac) {
                Ok(Some(n)) => break n,
                Ok(None) if start.elapsed() < nic_wait => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => return Err(declined(format!("no NIC with MAC {mac}"))),
                Err(e) => return Err(RemoteError::from_io("listing /sys/class/net", &e)),
            }
        };
        if l.is_static() {
            // Nothing else will configure it: the address is set whatever the NIC has.
            found.push((l.clone(), name, index));
            continue;
        }
        if at(root, &format!("/run/systemd/netif/links/{index}")).exists() {
            return Err(declined(format!("systemd-networkd already manages {name}")));
        }
        match has_ipv4(&name) {
            Ok(false) => {}
            Ok(true) => return Err(declined(format!("{name} already has an IPv4 address"))),
            Err(e) => return Err(RemoteError::from_io(&format!("checking {name}"), &e)),
        }
        found.push((l.clone(), name, index));
    }
    // Static addresses are not networkd's DHCP's to take over: keep every foreign one.
    let keep = if any_static { "yes" } else { "dhcp" };
    for n in network_files(root) {
        files.push((
            at(root, &format!("/run/systemd/network/{n}.d/{DROPIN}")),
            format!("# kiln: keep the addresses kiln set before networkd started\n[Network]\nKeepConfiguration={keep}\n"),
        ));
    }
    Ok(Plan {
        links: found,
        files,
        stub,
        resolvectl,
        dns_skipped,
    })
}

/// The runtime files are written like the cleanup's files: temp file, mode, rename.
fn write(path: &Path, text: &str) -> Result<(), RemoteError> {
    super::cleanup::write_file(path, 0o644, text.as_bytes())
        .map_err(|e| RemoteError::from_io(&format!("writing {}", path.display()), &e))
}

/// Carry the plan out: drop-ins first (so a networkd that starts meanwhile already keeps the
/// address), then the kernel's configuration, then resolved's stub file.
pub fn apply(plan: &Plan, nl: &mut rtnetlink::Socket) -> Result<String, RemoteError> {
    for (p, text) in &plan.files {
        write(p, text)?;
    }
    let mut done = Vec::new();
    for (l, name, index) in &plan.links {
        let nlerr =
            |what: &str, e: io::Error| RemoteError::from_io(&format!("{what} on {name}"), &e);
        let seq = nl.next_seq();
        nl.request(seq, &rtnetlink::link_up(seq, *index))
            .map_err(|e| nlerr("bringing the link up", e))?;
        let seq = nl.next_seq();
        nl.request(
            seq,
            &rtnetlink::add_address(seq, *index, l.address, l.prefix, l.lease_secs.max(60)),
        )
        .map_err(|e| nlerr(&format!("adding {}/{}", l.address, l.prefix), e))?;
        if let Some(gw) = l.gateway {
            let seq = nl.next_seq();
            nl.request(
                seq,
                &rtnetlink::add_default_route(seq, *index, gw, l.address, l.is_static()),
            )
            .map_err(|e| nlerr(&format!("adding the default route via {gw}"), e))?;
        }
        done.push(format!("{name} {}/{}", l.address, l.prefix));
    }
    if let Some((p, text)) = &plan.stub {
        if !p.exists() {
            write(p, text)?;
        }
    }
    if !plan.resolvectl.is_empty() {
        done.push(tell_resolved(&plan.links, &plan.resolvectl));
    }
    if let Some(why) = &plan.dns_skipped {
        done.push(format!("DNS left to the guest ({why})"));
    }
    Ok(done.join(", "))
}

/// Gives a running systemd-resolved the DNS servers of static links, per link. Best effort:
/// the result is reported, the addresses stay configured either way.
fn tell_resolved(links: &[(LinkConfig, String, u32)], dns: &[Ipv4Addr]) -> String {
    let mut notes = Vec::new();
    for (l, name, _) in links.iter().filter(|(l, _, _)| l.is_static()) {
        let servers: Vec<String> = if l.dns.is_empty() { dns } else { &l.dns }
            .iter()
            .map(|a| a.to_string())
            .collect();
        let r = std::process::Command::new("resolvectl")
            .arg("dns")
            .arg(name)
            .args(&servers)
            .output();
        notes.push(match r {
            Ok(o) if o.status.success() => format!("{name} DNS {}", servers.join(" ")),
            Ok(o) => format!(
                "resolvectl dns {name}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("resolvectl dns {name}: {e}"),
        });
    }
    notes.join(", ")
}

/// `NetConfig` on this guest.
pub fn configure(links: &[LinkConfig]) -> Result<String, RemoteError> {
    let plan = plan(Path::new("/"), links, NIC_WAIT, &has_ipv4)?;
    let mut nl = rtnetlink::Socket::open()
        .map_err(|e| RemoteError::from_io("opening a route netlink socket", &e))?;
    apply(&plan, &mut nl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(mac: [u8; 6]) -> LinkConfig {
        LinkConfig {
            mac,
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 1)],
            search: vec!["lab".into()],
            lease_secs: 3600,
        }
    }

    /// A fake guest root: one NIC in sysfs, a networkd file, resolv.conf -> resolved's stub.
    fn guest_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let nic = at(r, "/sys/class/net/enp0s3");
        std::fs::create_dir_all(&nic).unwrap();
        std::fs::write(nic.join("address"), "02:00:00:00:00:0a\n").unwrap();
        std::fs::write(nic.join("ifindex"), "2\n").unwrap();
        std::fs::create_dir_all(at(r, "/etc/systemd/network")).unwrap();
        std::fs::write(
            at(r, "/etc/systemd/network/80-kiln-dhcp.network"),
            "[Match]\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            at(r, "/etc/resolv.conf"),
        )
        .unwrap();
        t
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xa];

    #[test]
    fn plan_names_the_nic_and_the_runtime_files() {
        let t = guest_root();
        let p = plan(t.path(), &[link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap();
        assert_eq!(p.links.len(), 1);
        assert_eq!((p.links[0].1.as_str(), p.links[0].2), ("enp0s3", 2));
        let files: Vec<String> = p
            .files
            .iter()
            .map(|(f, _)| f.strip_prefix(t.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            files,
            [
                "run/systemd/resolved.conf.d/90-kiln-build.conf",
                "run/systemd/network/80-kiln-dhcp.network.d/90-kiln-build.conf"
            ]
        );
        assert!(p.files[0].1.contains("DNS=10.0.2.1\nDomains=lab\n"));
        assert!(p.files[1].1.contains("KeepConfiguration=dhcp"));
        let (stub, text) = p.stub.as_ref().unwrap();
        assert_eq!(stub, &at(t.path(), "/run/systemd/resolve/stub-resolv.conf"));
        assert!(text.contains("nameserver 10.0.2.1\nsearch lab\n"));
        // Nothing was written by planning.
        assert!(!at(t.path(), "/run").exists());
    }

    #[test]
    fn declines_without_changing_anything() {
        let t = guest_root();
        let r = t.path();
        let err = plan(r, &[link([2, 0, 0, 0, 0, 0xb])], Duration::ZERO, &|_| {
            Ok(false)
        })
        .unwrap_err();
        assert!(
            err.message.contains("no NIC with MAC 02:00:00:00:00:0b"),
            "{err}"
        );
        let err = plan(r, &[link(MAC)], Duration::ZERO, &|_| Ok(true)).unwrap_err();
        assert!(
            err.message.contains("enp0s3 already has an IPv4 address"),
            "{err}"
        );
        std::fs::create_dir_all(at(r, "/run/systemd/netif/links")).unwrap();
        std::fs::write(at(r, "/run/systemd/netif/links/2"), "").unwrap();
        let err = plan(r, &[link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap_err();
        assert!(
            err.message.contains("networkd already manages enp0s3"),
            "{err}"
        );
        std::fs::remove_file(at(r, "/run/systemd/netif/links/2")).unwrap();
        std::fs::create_dir_all(at(r, "/run/systemd/resolve")).unwrap();
        std::fs::write(at(r, "/run/systemd/resolve/io.systemd.Resolve"), "").unwrap();
        let err = plan(r, &[link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap_err();
        assert!(err.message.contains("resolved already runs"), "{err}");
        // A plain resolv.conf without a server.
        std::fs::remove_file(at(r, "/etc/resolv.conf")).unwrap();
        std::fs::write(at(r, "/etc/resolv.conf"), "search x\n").unwrap();
        let err = plan(r, &[link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap_err();
        assert!(err.message.contains("names no DNS server"), "{err}");
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(!at(r, "/run/systemd/network").exists());
        // One with a server is left alone, and the plan goes ahead without a stub.
        std::fs::write(at(r, "/etc/resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        let p = plan(r, &[link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap();
        assert!(p.stub.is_none());
        assert_eq!(p.files.len(), 1);
    }

    fn static_link(mac: [u8; 6]) -> LinkConfig {
        LinkConfig {
            address: Ipv4Addr::new(10, 0, 2, 16),
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            search: Vec::new(),
            lease_secs: crate::message::STATIC_LEASE,
            ..link(mac)
        }
    }

    #[test]
    fn static_addresses_are_never_declined() {
        let t = guest_root();
        let r = t.path();
        // What declines a lease: an address already there, networkd managing the NIC.
        std::fs::create_dir_all(at(r, "/run/systemd/netif/links")).unwrap();
        std::fs::write(at(r, "/run/systemd/netif/links/2"), "").unwrap();
        let p = plan(r, &[static_link(MAC)], Duration::ZERO, &|_| Ok(true)).unwrap();
        assert_eq!(p.links.len(), 1);
        assert!(p.files.iter().any(|(f, text)| f
            .ends_with("run/systemd/network/80-kiln-dhcp.network.d/90-kiln-build.conf")
            && text.contains("KeepConfiguration=yes\n")));
        assert!(p.files[0].1.contains("DNS=192.0.2.53\n"), "{:?}", p.files);
        assert!(p
            .stub
            .as_ref()
            .unwrap()
            .1
            .contains("nameserver 192.0.2.53\n"));
        assert!(p.resolvectl.is_empty());
        // resolved running: its drop-in for later, `resolvectl` for now, no stub.
        std::fs::create_dir_all(at(r, "/run/systemd/resolve")).unwrap();
        std::fs::write(at(r, "/run/systemd/resolve/io.systemd.Resolve"), "").unwrap();
        let p = plan(r, &[static_link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap();
        assert!(p.stub.is_none());
        assert_eq!(p.resolvectl, [Ipv4Addr::new(192, 0, 2, 53)]);
        // A resolv.conf kiln cannot tell: DNS is the guest's, the address is configured.
        std::fs::remove_file(at(r, "/etc/resolv.conf")).unwrap();
        std::fs::write(at(r, "/etc/resolv.conf"), "search x\n").unwrap();
        let p = plan(r, &[static_link(MAC)], Duration::ZERO, &|_| Ok(false)).unwrap();
        assert_eq!(p.links.len(), 1);
        assert!(p
            .dns_skipped
            .as_deref()
            .unwrap()
            .contains("names no DNS server"));
        // A lease in the same request still needs a NIC of its own to configure cleanly.
        let mut lease = link(MAC);
        lease.lease_secs = 3600;
        assert!(plan(r, &[lease], Duration::ZERO, &|_| Ok(false)).is_err());
    }

    #[test]
    fn a_nic_that_appears_late_is_waited_for() {
        let t = guest_root();
        let late = at(t.path(), "/sys/class/net/enp0s4");
        let l2 = late.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::create_dir_all(&l2).unwrap();
            std::fs::write(l2.join("ifindex"), "3\n").unwrap();
            std::fs::write(l2.join("address"), "02:00:00:00:00:0c\n").unwrap();
        });
        let p = plan(
            t.path(),
            &[link([2, 0, 0, 0, 0, 0xc])],
            Duration::from_secs(5),
            &|_| Ok(false),
        )
        .unwrap();
        h.join().unwrap();
        assert_eq!(p.links[0].2, 3);
    }

    fn ip(args: &[&str]) -> String {
        let o = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The whole request against the kernel, in a network namespace of its own with a TAP
    /// device as the NIC (the guest root, sysfs included, is a temp folder).
    #[test]
    fn configures_a_real_nic_in_a_network_namespace() {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: configures_a_real_nic_in_a_network_namespace needs root (a network namespace)");
            return;
        }
        if std::process::Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIP: configures_a_real_nic_in_a_network_namespace needs `ip` (Debian package iproute2)");
            return;
        }
        let t = guest_root();
        let root = t.path().to_path_buf();
        std::thread::spawn(move || {
            // SAFETY: unshare with a constant flag; this thread alone moves to the new namespace
            // (and the programs it starts), the test process stays where it was.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "unshare: {}",
                io::Error::last_os_error()
            );
            ip(&["tuntap", "add", "dev", "kt0", "mode", "tap"]);
            let line = ip(&["-o", "link", "show", "kt0"]);
            let index: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
            let mac_text = line
                .split("link/ether ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            let mut mac = [0u8; 6];
            for (m, h) in mac.iter_mut().zip(mac_text.split(':')) {
                *m = u8::from_str_radix(h, 16).unwrap();
            }
            std::fs::remove_dir_all(at(&root, "/sys/class/net/enp0s3")).unwrap();
            let nic = at(&root, "/sys/class/net/kt0");
            std::fs::create_dir_all(&nic).unwrap();
            std::fs::write(nic.join("address"), format!("{mac_text}\n")).unwrap();
            std::fs::write(nic.join("ifindex"), format!("{index}\n")).unwrap();

            let p = plan(&root, &[link(mac)], Duration::ZERO, &has_ipv4).unwrap();
            let mut nl = rtnetlink::Socket::open().unwrap();
            let done = apply(&p, &mut nl).unwrap();
            assert_eq!(done, "kt0 10.0.2.15/24");
            let addr = ip(&["-4", "-o", "addr", "show", "kt0"]);
            assert!(addr.contains("inet 10.0.2.15/24 brd 10.0.2.255"), "{addr}");
            assert!(
                addr.contains("valid_lft 3600sec") || addr.contains("valid_lft 3599sec"),
                "a dynamic address: {addr}"
            );
            let route = ip(&["-4", "route", "show", "default"]);
            assert!(
                route.contains("default via 10.0.2.1 dev kt0 proto dhcp src 10.0.2.15 metric 1024"),
                "{route}"
            );
            assert!(std::fs::read_to_string(at(
                &root,
                "/run/systemd/network/80-kiln-dhcp.network.d/90-kiln-build.conf"
            ))
            .unwrap()
            .contains("KeepConfiguration=dhcp"));
            assert!(
                std::fs::read_to_string(at(&root, "/run/systemd/resolve/stub-resolv.conf"))
                    .unwrap()
                    .contains("nameserver 10.0.2.1")
            );
            // Configured once, the NIC is the guest's: a second request is declined.
            let err = plan(&root, &[link(mac)], Duration::ZERO, &has_ipv4).unwrap_err();
            assert!(
                err.message.contains("kt0 already has an IPv4 address"),
                "{err}"
            );
            // A static address is not: it is permanent, its default route `proto static`.
            let mut s = link(mac);
            s.address = Ipv4Addr::new(10, 0, 2, 16);
            s.lease_secs = crate::message::STATIC_LEASE;
            let p = plan(&root, &[s], Duration::ZERO, &has_ipv4).unwrap();
            assert_eq!(apply(&p, &mut nl).unwrap(), "kt0 10.0.2.16/24");
            let addr = ip(&["-4", "-o", "addr", "show", "kt0"]);
            assert!(
                addr.lines().any(
                    |l| l.contains("inet 10.0.2.16/24 brd 10.0.2.255 scope global")
                        && !l.contains("dynamic")
                        && l.contains("valid_lft forever")
                ),
                "a permanent address: {addr}"
            );
            let route = ip(&["-4", "route", "show", "default"]);
            assert!(
                route.contains(
                    "default via 10.0.2.1 dev kt0 proto static src 10.0.2.16 metric 1024"
                ),
                "{route}"
            );
        })
        .join()
        .unwrap();
    }
}
