//! virtio-net in a kiln VM: kiln's net device logic (`VirtioNet`, the same `NetHandler` the
//! vhost-user backend serves to QEMU) behind kiln-vmm's virtio-mmio transport, plugged into
//! a kiln-net frame port whose other end the test holds. A tiny guest driver
//! (`kvm_support::virtio_guest`) does the virtio handshake, reads the MAC from config
//! space, posts receive buffers, transmits frames with that MAC as their source, and
//! checks the frames the host sends back, all through the transport's registers, its own
//! rings, QueueNotify (ioeventfd) and the device interrupt (irqfd).
//!
//! The checks are those of `net_qemu.rs`: frames both ways through a frame port, the MAC
//! from config, none lost or reordered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kvm_support::virtio_guest::{reg, Buf, Device, Script, VIRTIO_F_VERSION_1};
use crate::kvm_support::{finish_script, kvm_or_skip, log_warnings, start_script, wait_script};
use kiln_net::{port_pair, FramePort, QueuePort};
use kiln_vmm::devices::net::device::VIRTIO_ID_NET;
use kiln_vmm::devices::net::VirtioNet;
use kiln_vmm::exit::ExitReason;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x76, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // IEEE local experimental
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const HDR: u32 = 12;
/// Sizes of the frames each side sends (a minimum-size frame, a full 1500-byte MTU frame
/// and one in between).
const GUEST_FRAMES: [usize; 3] = [60, 1514, 342];
const HOST_FRAMES: [usize; 3] = [1514, 64, 777];
const RX_BUF: u32 = HDR + 1514;
/// Where the negative test changes a byte of the host's second frame.
const CORRUPT_AT: usize = 40;

fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..len - 14).map(|i| tag.wrapping_mul(31).wrapping_add(i as u8)));
    f
}

/// What the guest sends: to the host, from its own MAC (zero in the template; the guest
/// copies it in from config space).
fn guest_frames() -> Vec<Vec<u8>> {
    GUEST_FRAMES
        .iter()
        .enumerate()
        .map(|(i, &len)| frame(HOST_MAC, MAC, len, i as u8 + 1))
        .collect()
}

fn host_frames() -> Vec<Vec<u8>> {
    HOST_FRAMES
        .iter()
        .enumerate()
        .map(|(i, &len)| frame(MAC, HOST_MAC, len, i as u8 + 0x40))
        .collect()
}

fn script() -> Script {
    let mut s = Script::new(1);
    let dev = Device::new(0);
    let mut rx = s.virtq(dev, 0, 16);
    let mut tx = s.virtq(dev, 1, 16);
    let features = VIRTIO_F_VERSION_1 | F_MAC | F_STATUS;
    s.init_device(dev, VIRTIO_ID_NET, features, features, 256, &[&rx, &tx]);
    let mac_lo = u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]);
    let mac_hi = u16::from_le_bytes([MAC[4], MAC[5]]);
    s.expect(
        4,
        dev.reg(reg::CONFIG),
        mac_lo.into(),
        "config: MAC bytes 0-3",
    );
    s.expect(
        2,
        dev.reg(reg::CONFIG + 4),
        mac_hi.into(),
        "config: MAC bytes 4-5",
    );
    s.expect(2, dev.reg(reg::CONFIG + 6), 1, "config: link up");

    // Four receive buffers (one more than the host sends), alternately one descriptor and
    // a header descriptor plus a frame descriptor.
    let mut rx_bufs = Vec::new();
    for i in 0..4 {
        let b = s.alloc(u64::from(RX_BUF), 64);
        s.write(1, b, 0xff, "flags poison");
        s.write(1, b + 10, 0xff, "num_buffers poison");
        let head = if i % 2 == 0 {
            s.add_chain(&mut rx, &[Buf::W(b, RX_BUF)])
        } else {
            s.add_chain(
                &mut rx,
                &[Buf::W(b, HDR), Buf::W(b + u64::from(HDR), RX_BUF - HDR)],
            )
        };
        rx_bufs.push((head, b));
    }
    s.kick(&rx);

    // Three frames out, in three chain shapes, with one notification; the guest fills in
    // its source MAC from config space.
    let mut heads = Vec::new();
    for (i, f) in guest_frames().iter().enumerate() {
        let mut template = vec![0u8; HDR as usize];
        template.extend_from_slice(&HOST_MAC);
        template.extend_from_slice(&[0; 6]);
        template.extend_from_slice(&f[12..]);
        let at = s.place(&template);
        let fr = at + u64::from(HDR);
        s.copy(fr + 6, dev.reg(reg::CONFIG), 6, "source MAC from config");
        let len = f.len() as u32;
        let chain = match i {
            0 => vec![Buf::R(at, HDR), Buf::R(fr, len)],
            1 => vec![Buf::R(at, HDR + len)],
            _ => vec![
                Buf::R(at, HDR),
                Buf::R(fr, 100),
                Buf::R(fr + 100, len - 100),
            ],
        };
        heads.push(s.add_chain(&mut tx, &chain));
    }
    s.kick(&tx);
    s.wait_used(&mut tx, 3, "transmit");
    for (i, h) in heads.iter().enumerate() {
        s.expect_used(&tx, i as u16, *h, 0, &format!("tx frame {i}"));
    }

    // The host answers once it has all three: three frames in, in order, whole.
    s.wait_used(&mut rx, 3, "receive");
    for (i, f) in host_frames().iter().enumerate() {
        let (head, b) = rx_bufs[i];
        let what = format!("rx frame {i}");
        s.expect_used(&rx, i as u16, head, HDR + f.len() as u32, &what);
        s.expect(2, b + 10, 1, format!("{what}: num_buffers"));
        s.expect(1, b, 0, format!("{what}: header flags"));
        s.compare_with(b + u64::from(HDR), f, format!("{what}: content"));
    }
    s.expect_used_idx(&rx, "no fourth frame");
    s.expect_interrupts(dev);
    s.print("kiln-net: ok\n");
    s.end();
    s
}

/// The host end: wait for the guest's three frames, check them, then send three back.
fn host(port: Arc<QueuePort>, corrupt: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    for (i, want) in guest_frames().iter().enumerate() {
        let n = loop {
            match port.recv(&mut buf) {
                Ok(Some(n)) => break n,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Ok(None) => return Err(format!("guest frame {i} did not arrive")),
                Err(e) => return Err(format!("port: {e}")),
            }
        };
        if buf[..n] != want[..] {
            return Err(format!(
                "guest frame {i}: {n} bytes, src {:02x?}, differs from the {} expected",
                &buf[6..12.min(n)],
                want.len()
            ));
        }
    }
    for (i, mut f) in host_frames().into_iter().enumerate() {
        if corrupt && i == 1 {
            f[CORRUPT_AT] ^= 0x10;
        }
        port.send(&f).map_err(|e| format!("send: {e}"))?;
    }
    Ok(())
}

#[test]
fn guest_driver_net_frames_both_ways_with_config_mac() {
    if !kvm_or_skip("guest_driver_net_frames_both_ways_with_config_mac") {
        return;
    }
    log_warnings();
    let (dev_end, net_end) = port_pair(16).unwrap();
    let net_end = Arc::new(net_end);
    let s = script();
    let mut m = start_script(&s, vec![Box::new(VirtioNet::new(Arc::new(dev_end), MAC))]);
    let h = {
        let p = net_end.clone();
        std::thread::spawn(move || host(p, false))
    };
    let console = finish_script(&mut m, &s);
    assert_eq!(console, "kiln-net: ok\n");
    h.join().unwrap().unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        matches!(net_end.recv(&mut buf), Ok(None)),
        "the guest sent more than three frames"
    );
    assert_eq!(net_end.dropped(), 0, "host frames dropped before the guest");
}

/// The guest's checks can fail: a host frame with one byte changed is caught by the
/// content comparison, which reports the step and the offset of the first difference.
#[test]
fn guest_driver_net_catches_a_changed_frame() {
    if !kvm_or_skip("guest_driver_net_catches_a_changed_frame") {
        return;
    }
    let (dev_end, net_end) = port_pair(16).unwrap();
    let net_end = Arc::new(net_end);
    let s = script();
    let mut m = start_script(&s, vec![Box::new(VirtioNet::new(Arc::new(dev_end), MAC))]);
    let h = {
        let p = net_end.clone();
        std::thread::spawn(move || host(p, true))
    };
    let (reason, console) = wait_script(&mut m);
    h.join().unwrap().unwrap();
    assert_eq!(reason, ExitReason::Poweroff, "console: {console:?}");
    assert!(!console.contains("kiln-net: ok"), "{console:?}");
    let err = s
        .verdict(&console)
        .expect_err("the changed frame must fail a check");
    assert!(
        err.contains("rx frame 1: content") && err.contains(&format!("got {CORRUPT_AT:#x};")),
        "{err}"
    );
}
