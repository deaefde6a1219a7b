//! The `kvm` engine end to end on /dev/kvm (PVM included): `KvmEngine::launch` runs the real
//! `kiln __vmm` child for a `VmLaunch` whose kernel is a tiny guest program (an ELF built
//! from the test kit's script-driven virtio driver, `kiln_e2e::virtio_guest`, shared with
//! kiln-vmm's tests). The guest drives the three devices the engine gives
//! it through virtio-mmio: the qcow2 overlay (virtio-blk), the NIC (virtio-net, frames
//! crossing the process boundary on the engine's seqpacket socket to a kiln-net port held
//! here) and vsock (the host connects through the engine's socket with `CONNECT`).
//!
//! The guest boots twice. Its program reads a marker sector and ends by writing that byte
//! to the ACPI power port: the test prepares the disk so the first boot reads the reset
//! value, and each boot rewrites the marker to the power-off value. So boot 1 resets (the
//! VMM process ends with `Reset`), the engine starts a fresh VMM with the same spec, boot 2
//! does the same work again through the same vsock socket path and the same NIC socket, and
//! powers off. The test checks the two boots ran in two different VMM processes, and after
//! the exit reads the guest's writes back from the qcow2 with kiln_disk.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_builder::engine::kvm::KvmEngine;
use kiln_builder::engine::BootMode;
use kiln_builder::engine::{DiskAttach, Engine, NicAttach, RunningVm, VmLaunch};
use kiln_builder::sources::BootFiles;
use kiln_disk::OpenOptions;
use kiln_e2e::kvm_or_skip;
use kiln_e2e::virtio_guest::{
    self, reg, Buf, Device, Script, END_VALUE, POWEROFF, RESET, VIRTIO_F_VERSION_1,
};
use kiln_net::{port_pair, FramePort, QueuePort};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6b, 0x76, 0x07];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];
const CID: u32 = 9;
const GUEST_PORT: u32 = 1234;

const DISK_SIZE: u64 = 4 << 20;
/// The sector whose first byte decides how the guest ends.
const MARKER_SECTOR: u64 = 1;
/// Where each boot writes its pattern.
const DATA_SECTOR: u64 = 300;

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_VSOCK: u32 = 19;
const NET_HDR: u32 = 12;
const VSOCK_HDR: u32 = 44;
const HOST_MSG: usize = 100;

fn blk_header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn data_pattern() -> Vec<u8> {
    (0..512u32).map(|i| (i * 7 + 3) as u8).collect()
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len - 14).map(|i| tag.wrapping_add(i as u8)));
    f
}

fn host_msg() -> Vec<u8> {
    (0..HOST_MSG).map(|i| (i as u8) ^ 0x5a).collect()
}

/// The guest program (the same on both boots).
fn script() -> Script {
    let mut s = Script::new(3);
    let (blk, net, vsock) = (Device::new(0), Device::new(1), Device::new(2));

    // -- virtio-blk: the overlay.
    let mut bq = s.virtq(blk, 0, 16);
    s.init_device(
        blk,
        VIRTIO_ID_BLOCK,
        VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1,
        256,
        &[&bq],
    );
    s.expect(4, blk.reg(reg::CONFIG), DISK_SIZE / 512, "blk capacity");
    // Read the marker; its first byte is what END writes to the power port.
    let marker = s.alloc(512, 512);
    let h = s.place(&blk_header(0, MARKER_SECTOR));
    let st = s.alloc(1, 1);
    s.submit(
        &mut bq,
        &[Buf::R(h, 16), Buf::W(marker, 512), Buf::W(st, 1)],
        513,
        "read the marker",
    );
    s.expect(1, st, 0, "read the marker: status");
    s.copy(END_VALUE, marker, 1, "how this boot ends");
    // The next boot powers off.
    let next = s.place(&[POWEROFF as u8; 512]);
    let h = s.place(&blk_header(1, MARKER_SECTOR));
    let st = s.alloc(1, 1);
    s.submit(
        &mut bq,
        &[Buf::R(h, 16), Buf::R(next, 512), Buf::W(st, 1)],
        1,
        "rewrite the marker",
    );
    s.expect(1, st, 0, "rewrite the marker: status");
    let data = s.place(&data_pattern());
    let h = s.place(&blk_header(1, DATA_SECTOR));
    let st = s.alloc(1, 1);
    s.submit(
        &mut bq,
        &[Buf::R(h, 16), Buf::R(data, 512), Buf::W(st, 1)],
        1,
        "write the data sector",
    );
    s.expect(1, st, 0, "write the data sector: status");
    s.print("blk ok\n");

    // -- virtio-net: one frame out (source MAC from config space), one frame in.
    let mut rx = s.virtq(net, 0, 16);
    let mut tx = s.virtq(net, 1, 16);
    let f_mac = 1 << 5;
    s.init_device(
        net,
        VIRTIO_ID_NET,
        VIRTIO_F_VERSION_1 | f_mac,
        VIRTIO_F_VERSION_1 | f_mac,
        256,
        &[&rx, &tx],
    );
    let rx_len = NET_HDR + 1514;
    let rb = s.alloc(u64::from(rx_len), 64);
    let rx_head = s.add_chain(&mut rx, &[Buf::W(rb, rx_len)]);
    s.kick(&rx);
    let out = frame(HOST_MAC, [0; 6], 80, 0x10);
    let mut with_hdr = vec![0u8; NET_HDR as usize];
    with_hdr.extend_from_slice(&out);
    let at = s.place(&with_hdr);
    s.copy(
        at + u64::from(NET_HDR) + 6,
        net.reg(reg::CONFIG),
        6,
        "source MAC from config",
    );
    s.submit(
        &mut tx,
        &[Buf::R(at, NET_HDR + out.len() as u32)],
        0,
        "transmit a frame",
    );
    s.wait_used(&mut rx, 1, "receive a frame");
    let back = frame(MAC, HOST_MAC, 90, 0x60);
    s.expect_used(
        &rx,
        0,
        rx_head,
        NET_HDR + back.len() as u32,
        "the host's frame",
    );
    s.compare_with(rb + u64::from(NET_HDR), &back, "the host's frame: content");
    s.print("net ok\n");

    // -- virtio-vsock: accept the host's CONNECT, then wait for its data.
    let mut vrx = s.virtq(vsock, 0, 16);
    let mut vtx = s.virtq(vsock, 1, 16);
    let ev = s.virtq(vsock, 2, 16);
    s.init_device(
        vsock,
        VIRTIO_ID_VSOCK,
        VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1,
        256,
        &[&vrx, &vtx, &ev],
    );
    s.expect(4, vsock.reg(reg::CONFIG), CID.into(), "vsock guest_cid");
    let mut bufs = Vec::new();
    for _ in 0..2 {
        let h = s.alloc(u64::from(VSOCK_HDR), 64);
        let d = s.alloc(4096, 4096);
        let head = s.add_chain(&mut vrx, &[Buf::W(h, VSOCK_HDR), Buf::W(d, 4096)]);
        bufs.push((head, h, d));
    }
    s.kick(&vrx);
    let (head, req, _) = bufs[0];
    s.wait_used(&mut vrx, 1, "the host's CONNECT");
    s.expect_used(&vrx, 0, head, VSOCK_HDR, "the host's CONNECT");
    s.expect(2, req + 30, 1, "a REQUEST");
    s.expect(4, req + 20, GUEST_PORT.into(), "to the guest's port");
    // RESPONSE: src = the guest's port, dst = the host's port from the request.
    let mut resp = Vec::new();
    resp.extend_from_slice(&u64::from(CID).to_le_bytes());
    resp.extend_from_slice(&2u64.to_le_bytes());
    resp.extend_from_slice(&GUEST_PORT.to_le_bytes());
    resp.extend_from_slice(&0u32.to_le_bytes());
    resp.extend_from_slice(&0u32.to_le_bytes()); // len
    resp.extend_from_slice(&1u16.to_le_bytes()); // stream
    resp.extend_from_slice(&2u16.to_le_bytes()); // RESPONSE
    resp.extend_from_slice(&0u32.to_le_bytes()); // flags
    resp.extend_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
    resp.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    let rh = s.place(&resp);
    s.copy(rh + 20, req + 16, 4, "reply to the host's port");
    s.submit(&mut vtx, &[Buf::R(rh, VSOCK_HDR)], 0, "accept");
    let (head, h, d) = bufs[1];
    s.wait_used(&mut vrx, 1, "the host's data");
    s.expect_used(
        &vrx,
        1,
        head,
        VSOCK_HDR + HOST_MSG as u32,
        "the host's data",
    );
    s.expect(2, h + 30, 5, "an RW packet");
    s.compare_with(d, &host_msg(), "the host's data: content");
    s.print("vsock ok\n");
    s.end();
    s
}

/// Sends CONNECT through the engine's socket until a guest accepts; returns the stream.
fn connect(uds: &Path, deadline: Instant) -> Result<UnixStream, String> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| -> Result<UnixStream, String> {
            let mut c = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            c.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
                .map_err(|e| format!("CONNECT: {e}"))?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.last() != Some(&b'\n') {
                match c.read(&mut b) {
                    Ok(1) if line.len() < 32 => line.push(b[0]),
                    r => return Err(format!("reading OK: {r:?} after {line:?}")),
                }
            }
            if !line.starts_with(b"OK ") {
                return Err(format!("not OK: {line:?}"));
            }
            Ok(c)
        })();
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("no guest accepted CONNECT: {last}"))
}

/// The host's part of one boot: the guest's frame, a frame back, a vsock connection.
/// Returns the VMM pid seen while the guest held the connection open.
fn one_boot(
    vm: &std::sync::Mutex<Box<dyn RunningVm>>,
    port: &QueuePort,
    uds: &Path,
) -> Result<u32, String> {
    one_boot_then(vm, port, uds, &mut || {})
}

/// [`one_boot`], calling `between` once the guest has written its disk and waits for the
/// host's frame.
fn one_boot_then(
    vm: &std::sync::Mutex<Box<dyn RunningVm>>,
    port: &QueuePort,
    uds: &Path,
    between: &mut dyn FnMut(),
) -> Result<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 2048];
    let n = loop {
        match port.recv(&mut buf) {
            Ok(Some(n)) => break n,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => return Err("the guest's frame did not arrive".into()),
            Err(e) => return Err(format!("port: {e}")),
        }
    };
    let want = frame(HOST_MAC, MAC, 80, 0x10);
    if buf[..n] != want[..] {
        return Err(format!(
            "the guest's frame: {n} bytes from {:02x?}",
            &buf[6..12]
        ));
    }
    between();
    port.send(&frame(MAC, HOST_MAC, 90, 0x60))
        .map_err(|e| format!("send: {e}"))?;
    let mut c = connect(uds, deadline)?;
    // The guest now waits for our data: this boot's VMM is the current one.
    let pids = vm.lock().unwrap().pids();
    let [pid] = pids[..] else {
        return Err(format!("expected one VMM pid, got {pids:?}"));
    };
    c.write_all(&host_msg()).map_err(|e| format!("data: {e}"))?;
    Ok(pid)
}

/// The kvm engine on the `kiln` binary cargo built for these tests.
fn engine() -> KvmEngine {
    KvmEngine::with_exe(PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
}

/// A VM of the tiny guest `kernel`, run in `dir`, with `disk` as its one disk and `nic` as
/// its one NIC when given.
fn tiny_launch(
    dir: &Path,
    name: &str,
    kernel: PathBuf,
    disk: Option<PathBuf>,
    nic: Option<QueuePort>,
) -> VmLaunch {
    VmLaunch {
        name: name.into(),
        cpus: 1,
        memory_mib: virtio_guest::GUEST_MEMORY >> 20,
        boot: BootMode::Direct(BootFiles {
            kernel,
            initrd: None,
            root: "/dev/vda".into(),
            args: vec![],
        }),
        cmdline_extra: vec![],
        disks: disk
            .into_iter()
            .map(|path| DiskAttach {
                name: "root".into(),
                path,
                read_only: false,
                bus: Default::default(),
            })
            .collect(),
        workdir: dir.join("run"),
        serial_log: dir.join("serial.log"),
        cid: CID,
        peripherals: Default::default(),
        nics: nic
            .into_iter()
            .map(|n| NicAttach {
                name: "eth0".into(),
                mac: MAC,
                port: Arc::new(n),
                model: Default::default(),
            })
            .collect(),
    }
}

fn read_sector(path: &Path, sector: u64) -> Vec<u8> {
    let d = kiln_disk::open(path, OpenOptions::read_only()).expect("open the overlay");
    let mut b = vec![0u8; 512];
    d.read_at(&mut b, sector * 512).expect("read");
    b
}

/// The guest of the two-boot tests, its kernel file, and its disk: a raw base whose marker
/// says "reset", under a qcow2 overlay as a build makes them.
struct Twice {
    s: Script,
    kernel: PathBuf,
    base: PathBuf,
    overlay: PathBuf,
}

fn twice(dir: &Path) -> Twice {
    let kernel = dir.join("guest.elf");
    let s = script();
    std::fs::write(&kernel, s.elf()).unwrap();
    let base = dir.join("base.raw");
    let mut img = vec![0u8; DISK_SIZE as usize];
    img[512..1024].fill(RESET as u8);
    std::fs::write(&base, &img).unwrap();
    let overlay = dir.join("root.qcow2");
    kiln_disk::create_overlay(&overlay, &base, None).unwrap();
    Twice {
        s,
        kernel,
        base,
        overlay,
    }
}

#[test]
fn kvm_engine_runs_disk_net_vsock_and_restarts_the_vmm_on_reset() {
    if !kvm_or_skip("kvm_engine_runs_disk_net_vsock_and_restarts_the_vmm_on_reset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Twice {
        s,
        kernel,
        base,
        overlay,
    } = twice(dir.path());

    let (nic_end, switch_end) = port_pair(64).unwrap();
    let launch = tiny_launch(
        dir.path(),
        "tiny",
        kernel,
        Some(overlay.clone()),
        Some(nic_end),
    );
    let engine = engine();
    let vm = engine.launch(&launch).expect("launch");
    let uds = vm.vsock_socket().to_path_buf();
    let vm = std::sync::Mutex::new(vm);
    let serial = || std::fs::read_to_string(&launch.serial_log).unwrap_or_default();
    let stderr = || kiln_builder::engine::kvm::stderr_tail(&launch.workdir);

    let first = one_boot(&vm, &switch_end, &uds)
        .unwrap_or_else(|e| panic!("boot 1: {e}; serial: {:?}; stderr: {}", serial(), stderr()));
    let second = one_boot(&vm, &switch_end, &uds)
        .unwrap_or_else(|e| panic!("boot 2: {e}; serial: {:?}; stderr: {}", serial(), stderr()));
    assert_ne!(first, second, "the reset must start a fresh VMM process");
    assert_eq!(vm.lock().unwrap().vsock_socket(), uds, "same socket path");

    let status = vm
        .lock()
        .unwrap()
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .unwrap_or_else(|| panic!("the VM did not power off; serial: {:?}", serial()));
    let log = serial();
    if let Err(e) = s.verdict(&log) {
        panic!("{e}");
    }
    assert!(
        status.success(),
        "power-off is a clean exit: {status}; {log:?}"
    );
    assert!(!vm.lock().unwrap().is_running());
    assert!(vm.lock().unwrap().pids().is_empty());
    // Both boots' console output, with the engine's note between them, in the serial log.
    assert_eq!(
        log.matches("blk ok\nnet ok\nvsock ok\n").count(),
        2,
        "{log:?}"
    );
    assert!(
        log.contains(&format!(
            "[kiln kvm] VMM {first} ended: guest reset; starting a fresh VMM"
        )),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("[kiln kvm] VMM {second} ended: guest powered off")),
        "{log:?}"
    );
    drop(vm);

    // What the guest wrote is in the qcow2 overlay, the base untouched.
    assert_eq!(read_sector(&overlay, DATA_SECTOR), data_pattern());
    assert_eq!(
        read_sector(&overlay, MARKER_SECTOR),
        vec![POWEROFF as u8; 512]
    );
    assert_eq!(
        &std::fs::read(&base).unwrap()[512..1024],
        &[RESET as u8; 512]
    );
}

/// A kernel the VMM cannot boot: launch succeeds or fails, but never hangs, and the reason
/// is in the error or the serial log.
#[test]
fn kvm_engine_reports_a_guest_that_cannot_run() {
    if !kvm_or_skip("kvm_engine_reports_a_guest_that_cannot_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("not-a-kernel");
    std::fs::write(&kernel, b"this is not a kernel").unwrap();
    let launch = tiny_launch(dir.path(), "broken", kernel, None, None);
    let engine = engine();
    let e = engine
        .launch(&launch)
        .err()
        .expect("no VM from a bad kernel");
    let e = e.to_string();
    assert!(
        e.contains("the VMM could not boot the VM") && e.contains("not-a-kernel"),
        "{e}"
    );
}

/// `kill` stops a VM whose guest is still running (it waits for a frame that never comes):
/// the VMM process is gone (and reaped), no fresh one is started, and `wait_exit` answers.
#[test]
fn kvm_engine_kill_stops_the_vmm_and_starts_no_other() {
    if !kvm_or_skip("kvm_engine_kill_stops_the_vmm_and_starts_no_other") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("guest.elf");
    let s = script();
    std::fs::write(&kernel, s.elf()).unwrap();
    let disk = dir.path().join("root.raw");
    std::fs::write(&disk, vec![0u8; DISK_SIZE as usize]).unwrap();
    let (nic_end, switch_end) = port_pair(64).unwrap();
    let launch = tiny_launch(dir.path(), "stuck", kernel, Some(disk), Some(nic_end));
    let engine = engine();
    let mut vm = engine.launch(&launch).expect("launch");
    // The guest got as far as sending its frame: it now waits for ours.
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(30);
    while switch_end.recv(&mut buf).unwrap().is_none() {
        assert!(Instant::now() < deadline, "no frame from the guest");
        std::thread::sleep(Duration::from_millis(5));
    }
    let [pid] = vm.pids()[..] else {
        panic!("one VMM pid expected: {:?}", vm.pids());
    };
    assert!(vm.is_running());
    assert_eq!(vm.wait_exit(Duration::from_millis(100)).unwrap(), None);
    let t = Instant::now();
    vm.kill();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "kill took {:?}",
        t.elapsed()
    );
    assert!(!vm.is_running());
    assert!(vm.pids().is_empty(), "no fresh VMM after a kill");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "VMM {pid} still exists"
    );
    let st = vm.wait_exit(Duration::ZERO).unwrap().expect("ended");
    assert!(!st.success(), "a killed VM is not a clean power-off: {st}");
    let log = std::fs::read_to_string(&launch.serial_log).unwrap();
    assert_eq!(log, "blk ok\n", "{log:?}");
}

const HOLDER_ENV: &str = "KILN_TEST_KVM_HOLDER";

/// Runs only when re-executed by `a_killed_kiln_leaves_no_vmm_behind`: launches a VM whose
/// guest waits forever, prints the VMM's pid, and waits to be killed.
#[test]
#[ignore = "helper: the kiln stand-in the pdeathsig test kills"]
fn kvm_engine_holder() {
    let Ok(dir) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, script().elf()).unwrap();
    let disk = dir.join("root.raw");
    std::fs::write(&disk, vec![0u8; DISK_SIZE as usize]).unwrap();
    let (nic_end, _switch_end) = port_pair(64).unwrap();
    let launch = tiny_launch(dir.as_path(), "held", kernel, Some(disk), Some(nic_end));
    let engine = engine();
    let vm = engine.launch(&launch).expect("launch");
    println!("VMM-PID {}", vm.pids()[0]);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Whether `pid` is still a live process (a zombie waiting for init to reap it is dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// No VMM outlives kiln: SIGKILL the process that launched a VM (no destructor runs) and
/// its VMM dies too. Two things see to it: PR_SET_PDEATHSIG from the supervisor thread that
/// spawned it, and the VMM stopping its VM when its control socket closes; this test shows
/// the outcome, not which of the two came first.
#[test]
fn a_killed_kiln_leaves_no_vmm_behind() {
    if !kvm_or_skip("a_killed_kiln_leaves_no_vmm_behind") {
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut holder = kiln_e2e::helper_process::command(module_path!(), "kvm_engine_holder")
        .env(HOLDER_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // libtest prints `test kvm_engine_holder ... ` before the helper's line; read on a
    // thread so a holder that never prints cannot hang this test.
    let out = holder.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Some((_, p)) = line.split_once("VMM-PID ") {
                let _ = tx.send(p.trim().parse::<u32>());
                return;
            }
        }
    });
    let pid = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(pid)) => pid,
        other => {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("the holder printed no VMM pid: {other:?}");
        }
    };
    assert!(alive(pid), "VMM {pid} should be running");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "VMM {pid} outlived the process that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest that resets every time it boots (as a `panic=-1` kernel loop would): the engine
/// restarts it up to its limit, then ends the VM with the reset's status and a note.
#[test]
fn kvm_engine_gives_up_on_a_reset_loop() {
    if !kvm_or_skip("kvm_engine_gives_up_on_a_reset_loop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("reset.elf");
    let mut s = Script::new(1);
    s.print("boot\n");
    s.write(1, END_VALUE, RESET.into(), "end with a reset");
    s.end();
    std::fs::write(&kernel, s.elf()).unwrap();
    let launch = tiny_launch(dir.path(), "looping", kernel, None, None);
    let engine = engine();
    let mut vm = engine.launch(&launch).expect("launch");
    let st = vm
        .wait_exit(Duration::from_secs(60))
        .unwrap()
        .expect("the engine stops restarting");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.code(), Some(10), "the reset's exit status: {st:?}");
    let log = std::fs::read_to_string(&launch.serial_log).unwrap();
    let max = kiln_builder::engine::kvm::MAX_RESETS as usize;
    assert_eq!(log.matches("boot\n").count(), max + 1, "{log}");
    assert_eq!(log.matches("starting a fresh VMM").count(), max, "{log}");
    assert!(
        log.contains(&format!("{max} resets already, not restarting")),
        "{log}"
    );
    assert!(st.signal().is_none());
}

/// A guest that takes no request: the checkpoints below do not freeze (a tiny guest has no
/// file systems).
struct NoGuest;

impl kiln_builder::guest::Guest for NoGuest {
    fn exec(
        &mut self,
        _: &kiln_builder::guest::GuestCommand,
        _: &std::collections::BTreeMap<String, String>,
        _: Option<Duration>,
        _: &mut dyn FnMut(kiln_builder::events::Stream, &[u8]),
    ) -> Result<kiln_builder::guest::ExecOutcome, kiln_builder::guest::GuestError> {
        Err(kiln_builder::guest::GuestError::NotAvailable(
            "no guest".into(),
        ))
    }
    fn put_file(
        &mut self,
        _: &str,
        _: &[u8],
        _: u32,
    ) -> Result<(), kiln_builder::guest::GuestError> {
        Err(kiln_builder::guest::GuestError::NotAvailable(
            "no guest".into(),
        ))
    }
    fn reboot(&mut self) -> Result<(), kiln_builder::guest::GuestError> {
        Err(kiln_builder::guest::GuestError::NotAvailable(
            "no guest".into(),
        ))
    }
    fn poweroff(&mut self) -> Result<(), kiln_builder::guest::GuestError> {
        Err(kiln_builder::guest::GuestError::NotAvailable(
            "no guest".into(),
        ))
    }
}

/// The step cache's checkpoints on the kvm engine: a layer taken in each of the two boots'
/// VMM processes (the second after the reset, through the same checkpoint socket path),
/// each holding what the guest wrote by then, chained over the base.
#[test]
fn kvm_engine_takes_layers_in_the_vmm_across_a_reset() {
    use kiln_builder::step_cache::{Checkpointer, Freeze, LayerStore, StepInfo};
    if !kvm_or_skip("kvm_engine_takes_layers_in_the_vmm_across_a_reset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Twice {
        s,
        kernel,
        base,
        overlay,
    } = twice(dir.path());
    let cache = dir.path().join("cache");
    let store = LayerStore::at(&cache).unwrap();

    let (nic_end, switch_end) = port_pair(64).unwrap();
    let launch = tiny_launch(
        dir.path(),
        "tiny",
        kernel,
        Some(overlay.clone()),
        Some(nic_end),
    );
    let engine = engine().with_layer_root(Some(cache.clone()));
    let vm = engine.launch(&launch).expect("launch");
    let uds = vm.vsock_socket().to_path_buf();
    let disks = vm.checkpoint_disks();
    assert_eq!(disks.len(), 1, "the overlay is the one writable disk");
    let vm = std::sync::Mutex::new(vm);
    let cp = Checkpointer {
        store: &store,
        module: "m",
        vm: "tiny",
        disks: vec![("root".into(), disks[0].clone())],
        nvram: None,
        freeze: Freeze::No,
    };
    let keys = [1u8, 2].map(|i| kiln_builder::cache::sha256_bytes(&[i]));
    let mut layers = Vec::new();
    let mut pids = Vec::new();
    for boot in 0..2 {
        let mut between = || {
            let taken = cp
                .take(
                    &mut NoGuest,
                    &keys[boot],
                    boot.checked_sub(1).map(|p| keys[p].as_str()),
                    StepInfo {
                        number: boot + 1,
                        name: "boot",
                        kind: "shell",
                        seconds: 0.0,
                    },
                )
                .unwrap_or_else(|e| panic!("checkpoint in boot {}: {e}", boot + 1));
            // What a checkpoint costs on this engine (reported, not judged).
            eprintln!(
                "kvm checkpoint in boot {}: {:?} in all, {:?} in the block layer",
                boot + 1,
                taken.total,
                taken.disk
            );
            layers.push(kiln_builder::step_cache::checkpoint::layer_disk(
                &taken.dir, "root",
            ));
        };
        let pid = one_boot_then(&vm, &switch_end, &uds, &mut between)
            .unwrap_or_else(|e| panic!("boot {}: {e}", boot + 1));
        pids.push(pid);
    }
    assert_ne!(pids[0], pids[1], "two VMM processes");
    let status = vm
        .lock()
        .unwrap()
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .expect("the VM powers off");
    let log = std::fs::read_to_string(&launch.serial_log).unwrap();
    if let Err(e) = s.verdict(&log) {
        panic!("{e}");
    }
    assert!(status.success(), "{status}: {log:?}");
    drop(vm);

    for k in &keys {
        assert!(store.verified(k).is_some(), "layer {k} is whole");
    }
    // Layer 1: boot 1's writes over the base; layer 2 (boot 2, the second VMM) over layer 1;
    // the overlay over layer 2.
    assert_eq!(read_sector(&layers[0], DATA_SECTOR), data_pattern());
    assert_eq!(
        read_sector(&layers[0], MARKER_SECTOR),
        vec![POWEROFF as u8; 512]
    );
    let backing = |p: &Path| {
        kiln_disk::backing_name(p)
            .unwrap()
            .map(|b| std::fs::canonicalize(b).unwrap())
    };
    assert_eq!(
        backing(&layers[0]),
        Some(std::fs::canonicalize(&base).unwrap())
    );
    assert_eq!(
        backing(&layers[1]),
        Some(std::fs::canonicalize(&layers[0]).unwrap())
    );
    assert_eq!(
        backing(&overlay),
        Some(std::fs::canonicalize(&layers[1]).unwrap())
    );
    assert_eq!(read_sector(&overlay, DATA_SECTOR), data_pattern());
    assert_eq!(
        &std::fs::read(&base).unwrap()[512..1024],
        &[RESET as u8; 512]
    );
}
