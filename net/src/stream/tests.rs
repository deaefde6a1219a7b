use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use super::*;
use crate::{Network, NetworkConfig, NicConfig, SubnetConfig, VpcConfig};

/// A port on one end of a socket pair, the raw stream (QEMU's side) on the other.
fn pair() -> (StreamPort, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (StreamPort::new(a).unwrap(), b)
}

/// `frame` as QEMU puts it on the stream.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

/// Every frame the port has now.
fn drain(port: &StreamPort) -> Vec<Vec<u8>> {
    let mut buf = [0u8; MAX_FRAME];
    let mut out = Vec::new();
    while let Some(n) = port.recv(&mut buf).unwrap() {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Split a byte stream in QEMU's framing into frames; panics on a torn or bad frame.
fn unframe(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= LEN_BYTES, "torn length prefix");
        let n = u32::from_be_bytes(bytes[..LEN_BYTES].try_into().unwrap()) as usize;
        assert!((1..=MAX_FRAME).contains(&n), "bad length {n}");
        assert!(bytes.len() >= LEN_BYTES + n, "torn frame");
        out.push(bytes[LEN_BYTES..LEN_BYTES + n].to_vec());
        bytes = &bytes[LEN_BYTES + n..];
    }
    out
}

fn readable(fd: RawFd) -> bool {
    readable_within(fd, 0).unwrap()
}

#[test]
fn frames_split_at_every_byte_and_merged_two_per_write_arrive_whole() {
    let frames: [Vec<u8>; 2] = [(0..60).collect(), vec![0xa5; MAX_FRAME]];
    let mut wire = framed(&frames[0]);
    wire.extend(framed(&frames[1]));
    let (port, mut peer) = pair();
    for cut in 0..=wire.len() {
        let mut got = Vec::new();
        peer.write_all(&wire[..cut]).unwrap();
        got.extend(drain(&port));
        peer.write_all(&wire[cut..]).unwrap();
        got.extend(drain(&port));
        assert_eq!(got, frames, "split at byte {cut}");
        assert!(
            !readable(port.rx_fd()),
            "nothing left after the split at {cut}"
        );
    }
}

#[test]
fn rx_fd_is_readable_while_a_frame_waits() {
    let (port, mut peer) = pair();
    assert!(!readable(port.rx_fd()));
    let mut wire = framed(b"one");
    wire.extend(framed(b"two"));
    peer.write_all(&wire).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(port.recv(&mut buf).unwrap(), Some(3));
    assert!(readable(port.rx_fd()), "the second frame still waits");
    assert_eq!(port.recv(&mut buf).unwrap(), Some(3));
    assert_eq!(&buf[..3], b"two");
    assert!(!readable(port.rx_fd()));
    assert_eq!(port.recv(&mut buf).unwrap(), None);
}

#[test]
fn a_short_buffer_is_too_large_and_the_stream_stays_in_step() {
    let (port, mut peer) = pair();
    peer.write_all(&framed(&[7u8; 100])).unwrap();
    peer.write_all(&framed(b"next")).unwrap();
    let mut small = [0u8; 10];
    assert!(matches!(
        port.recv(&mut small),
        Err(PortError::TooLarge(100))
    ));
    assert_eq!(port.recv(&mut small).unwrap(), Some(4));
    assert_eq!(&small[..4], b"next");
}

#[test]
fn sent_frames_are_framed_for_the_peer() {
    let (port, mut peer) = pair();
    port.send(&[1u8; 60]).unwrap();
    port.send(&[2u8; MAX_FRAME]).unwrap();
    assert!(matches!(
        port.send(&[0u8; MAX_FRAME + 1]),
        Err(PortError::TooLarge(_))
    ));
    let mut wire = vec![0u8; 2 * LEN_BYTES + 60 + MAX_FRAME];
    peer.read_exact(&mut wire).unwrap();
    assert_eq!(unframe(&wire), vec![vec![1u8; 60], vec![2u8; MAX_FRAME]]);
}

#[test]
fn a_congested_peer_loses_whole_frames_never_part_of_one() {
    let (port, mut peer) = pair();
    // Lengths that do not divide the socket buffer, so the kernel takes part of some frame.
    let frame = |i: usize| vec![(i % 251) as u8; 1 + (i * 97) % MAX_FRAME];
    for i in 0..5_000 {
        port.send(&frame(i)).unwrap();
    }
    assert!(
        port.dropped() > 0,
        "the peer never read: frames were dropped"
    );
    peer.set_nonblocking(true).unwrap();
    let mut wire = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut read_all = |peer: &mut UnixStream, wire: &mut Vec<u8>| loop {
        match peer.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => wire.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    };
    read_all(&mut peer, &mut wire);
    // The switch's next visit writes the tail of a frame the kernel took part of.
    let mut buf = [0u8; MAX_FRAME];
    assert_eq!(port.recv(&mut buf).unwrap(), None);
    read_all(&mut peer, &mut wire);
    let got = unframe(&wire);
    // What arrived is frames the port was given, whole and in order.
    let mut next = 0;
    for f in &got {
        while frame(next) != *f {
            next += 1;
            assert!(next < 5_000, "a frame that was never sent arrived");
        }
        next += 1;
    }
    assert_eq!(got.len() as u64 + port.dropped(), 5_000);
    // And the link still works.
    port.send(b"after").unwrap();
    let mut tail = [0u8; LEN_BYTES + 5];
    peer.set_nonblocking(false).unwrap();
    peer.read_exact(&mut tail).unwrap();
    assert_eq!(unframe(&tail), vec![b"after".to_vec()]);
}

#[test]
fn a_waiting_tail_goes_out_before_the_next_frame() {
    let (port, mut peer) = pair();
    // As if the kernel had taken only the first 3 bytes of `tail` earlier.
    let tail = framed(b"tail-frame");
    (&port.stream).write_all(&tail[..3]).unwrap();
    {
        let mut tx = port.tx.lock().unwrap();
        tx.buf.extend_from_slice(&tail);
        tx.sent = 3;
    }
    port.send(b"next").unwrap();
    let mut wire = vec![0u8; tail.len() + LEN_BYTES + 4];
    peer.read_exact(&mut wire).unwrap();
    assert_eq!(
        unframe(&wire),
        vec![b"tail-frame".to_vec(), b"next".to_vec()]
    );
    assert_eq!(port.dropped(), 0);
}

/// What the port reports for a peer that sends `wire` and then closes.
#[allow(clippy::type_complexity)]
fn hostile(wire: &[u8]) -> (Vec<Result<Option<usize>, String>>, UnixStream, StreamPort) {
    let (port, mut peer) = pair();
    peer.write_all(wire).unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(port.recv(&mut buf).map_err(|e| match e {
            PortError::Closed => "closed".to_string(),
            e => e.to_string(),
        }));
    }
    assert_eq!(
        port.rx.lock().unwrap().body.len(),
        MAX_FRAME,
        "the reassembly buffer never grows"
    );
    (results, peer, port)
}

#[test]
fn a_bad_length_closes_the_link_with_a_clear_error() {
    for len in [u32::MAX, 0, MAX_FRAME as u32 + 1] {
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0u8; 64]);
        let (results, mut peer, _port) = hostile(&wire);
        let first = results[0].as_ref().unwrap_err();
        assert!(
            first.contains(&format!("frame length of {len} bytes")),
            "{len}: {first}"
        );
        assert_eq!(results[1], Err("closed".into()), "{len}");
        assert_eq!(results[2], Err("closed".into()), "{len}");
        // The peer sees the link go down while the port still exists.
        let mut b = [0u8; 8];
        assert_eq!(peer.read(&mut b).unwrap(), 0, "{len}");
    }
}

#[test]
fn a_peer_closing_mid_frame_is_closed() {
    let whole = framed(&[9u8; 300]);
    for cut in [2, LEN_BYTES, LEN_BYTES + 1, whole.len() - 1] {
        let (port, mut peer) = pair();
        let mut wire = framed(b"first");
        wire.extend_from_slice(&whole[..cut]);
        peer.write_all(&wire).unwrap();
        drop(peer);
        let mut buf = [0u8; MAX_FRAME];
        assert_eq!(port.recv(&mut buf).unwrap(), Some(5), "cut {cut}");
        assert!(
            matches!(port.recv(&mut buf), Err(PortError::Closed)),
            "{cut}"
        );
        assert!(matches!(port.send(b"x"), Err(PortError::Closed)), "{cut}");
    }
}

#[test]
fn a_peer_gone_before_a_send_is_closed() {
    let (port, peer) = pair();
    drop(peer);
    assert!(matches!(port.send(b"x"), Err(PortError::Closed)));
}

#[test]
fn the_listener_is_private_and_removed_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nic.sock");
    let l = StreamListener::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert_eq!(l.path(), path);
    assert_eq!(
        l.netdev_arg("n0"),
        format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            path.display()
        )
    );
    let e = StreamListener::bind(&path).unwrap_err();
    assert!(e.to_string().contains("nic.sock"), "{e}");
    assert!(l.try_accept().unwrap().is_none());
    let e = l.accept(Duration::from_millis(50)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(e.to_string().contains("nic.sock"), "{e}");

    let mut peer = UnixStream::connect(&path).unwrap();
    let port = l.accept(Duration::from_secs(5)).unwrap();
    peer.write_all(&framed(b"hello")).unwrap();
    let mut buf = [0u8; 16];
    let mut got = None;
    for _ in 0..100 {
        got = port.recv(&mut buf).unwrap();
        if got.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(got, Some(5));
    drop(l);
    assert!(!path.exists(), "socket file left behind");
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x00, 0x19];

/// One VPC and a DHCP subnet on 10.0.19.0/24.
fn network() -> Network {
    Network::new(NetworkConfig {
        vpcs: vec![VpcConfig {
            name: "default".into(),
            internet: false,
            host_access: false,
        }],
        subnets: vec![SubnetConfig {
            name: "default".into(),
            vpc: "default".into(),
            cidr: "10.0.19.0/24".parse().unwrap(),
            dhcp: true,
            unmanaged: false,
            dns: Vec::new(),
        }],
        ..NetworkConfig::default()
    })
    .unwrap()
}

fn nic() -> NicConfig {
    NicConfig {
        vm_name: "guest".into(),
        subnet: "default".into(),
        mac: GUEST_MAC,
        fixed_ip: None,
    }
}

#[test]
fn a_stream_port_plugs_into_the_switch_like_any_port() {
    let dir = tempfile::tempdir().unwrap();
    let l = StreamListener::bind(&dir.path().join("nic.sock")).unwrap();
    let mut peer = UnixStream::connect(l.path()).unwrap();
    let net = network();
    let gw = net
        .attach_port(nic(), Arc::new(l.accept(Duration::from_secs(5)).unwrap()))
        .unwrap();
    assert_eq!(gw, Ipv4Addr::new(10, 0, 19, 1));
    // An ARP request from the guest for its gateway, split in two writes.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[10, 0, 19, 50]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&gw.octets());
    let wire = framed(&arp);
    peer.write_all(&wire[..3]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    peer.write_all(&wire[3..]).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; LEN_BYTES];
    peer.read_exact(&mut head).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(head) as usize];
    peer.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..6], &GUEST_MAC, "addressed to the guest");
    assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&reply[20..22], &[0, 2], "a reply");
    assert_eq!(&reply[28..32], &gw.octets(), "for the gateway's address");
}

#[test]
fn qemu_connects_to_the_listener_at_start_up() {
    use kiln_e2e::qemu::{qemu_available, QEMU};
    if !qemu_available() {
        return kiln_e2e::skip("qemu-system-x86_64 is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let l = StreamListener::bind(&dir.path().join("nic.sock")).unwrap();
    // Paused (-S): no guest runs, but the netdev connects while QEMU starts.
    let mut qemu = std::process::Command::new(QEMU)
        .args(["-accel", "tcg", "-M", "q35", "-nodefaults", "-S"])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .args(["-netdev", &l.netdev_arg("n0"), "-device", "e1000,netdev=n0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let accepted = l.accept(Duration::from_secs(30));
    let _ = qemu.kill();
    let _ = qemu.wait();
    let port = accepted.unwrap();
    // QEMU has gone: the port reports the closed link rather than waiting.
    let mut buf = [0u8; MAX_FRAME];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match port.recv(&mut buf) {
            Err(PortError::Closed) => break,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("expected a closed link, got {other:?}"),
        }
    }
}

/// The network's HTTP service, at the gateway.
const HTTP_PORT: u16 = 8080;

/// udhcpc's hook: the guest only talks to its gateway (on link), so an address is enough.
const LEASE_SCRIPT: &str = "#!/bin/sh
[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && echo \"STREAM-LEASE ip=$ip hostname=$hostname\"
exit 0
";

/// A real guest on a QEMU-emulated NIC (not virtio) whose netdev is kiln's stream port: its
/// driver gets a DHCP lease from the switch and fetches a file from the network's HTTP
/// service at its gateway (TCP through the gateway, both ways over the stream). The Debian
/// cloud kernel the kit boots has no e1000 driver, so the NIC is QEMU's vmxnet3: the same
/// path through QEMU's net layer and `-netdev stream`.
#[test]
fn a_guest_on_an_emulated_nic_gets_a_lease_and_fetches_through_the_stream() {
    use kiln_e2e::initramfs::Initramfs;
    use kiln_e2e::kernel::guest_kernel;
    use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
    if !qemu_available() {
        return kiln_e2e::skip("qemu-system-x86_64 is not installed");
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => return kiln_e2e::skip(format!("cannot get the Debian cloud kernel: {e}")),
    };
    let body = kiln_e2e::pattern::pattern(19, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), &body).unwrap();
    let want = String::from_utf8(
        std::process::Command::new("sha256sum")
            .arg(dir.path().join("file"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let want = want.split_whitespace().next().unwrap().to_string();

    let init = format!(
        r#"
ip link set lo up
if ! ip link set eth0 up; then echo "STREAM-FAIL no eth0"; echo STREAM-DONE; poweroff -f; fi
if ! udhcpc -i eth0 -n -q -t 10 -T 2 -s /lease.sh; then echo "STREAM-FAIL dhcp"; fi
if wget -q -O /tmp/file http://10.0.19.1:{HTTP_PORT}/file; then
  echo "STREAM-SUM $(sha256sum /tmp/file | cut -d' ' -f1)"
else
  echo "STREAM-FAIL wget"
fi
echo STREAM-DONE
poweroff -f
"#
    );
    let initrd = dir.path().join("initrd.cpio");
    Initramfs::new()
        .busybox()
        .kernel(&kernel)
        .module("vmxnet3")
        .file("/lease.sh", LEASE_SCRIPT, 0o755)
        .init_script(&init)
        .build(&initrd)
        .unwrap();

    let net = network();
    net.http_dir(dir.path(), HTTP_PORT).unwrap();
    let l = StreamListener::bind(&dir.path().join("nic.sock")).unwrap();
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &dir.path().join("serial.log"))
        .arg(["-netdev".to_string(), l.netdev_arg("n0")])
        .arg([
            "-device".to_string(),
            format!("vmxnet3,netdev=n0,mac={mac}"),
        ]);
    cfg.shared_memory = false;
    let mut vm = Qemu::spawn(&cfg).unwrap();
    let port = l.accept(Duration::from_secs(30)).unwrap();
    net.attach_port(nic(), Arc::new(port)).unwrap();
    if let Err(e) = vm.wait_for("STREAM-DONE", Duration::from_secs(240)) {
        panic!("guest did not finish: {e}");
    }
    let out = vm.output();
    eprintln!("{out}");
    assert!(
        !out.contains("STREAM-FAIL"),
        "guest reported a failure:\n{out}"
    );
    assert!(
        out.contains("STREAM-LEASE ip=10.0.19.") && out.contains("hostname=guest"),
        "no DHCP lease:\n{out}"
    );
    assert!(
        out.contains(&format!("STREAM-SUM {want}")),
        "file fetched through the stream port differs (want {want}):\n{out}"
    );
    assert_eq!(net.resolve("guest").unwrap().len(), 1);
    vm.wait_exit(Duration::from_secs(20));
}
