//! One VMM process per VM: the test binary re-executes itself as the VMM child (as `kiln`
//! does with its hidden `__vmm` subcommand) and controls it over the socket.

use std::path::Path;

use std::time::{Duration, Instant};

use crate::kvm_support::{bzimage_running, kvm_or_skip};
use iced_x86::code_asm::*;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::process::protocol::VmState;
use kiln_vmm::process::{Response, VmProcess, VmSpec};

const CHILD_ENV: &str = "KILN_TEST_VMM_CHILD";

/// The child side: runs only when re-executed by `spawn_child`.
#[test]
#[ignore = "helper: the VMM child process the other tests in this file spawn"]
fn vmm_child_entry() {
    let Ok(arg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (socket, spec) = arg.split_once('\n').expect("socket and spec");
    let spec: VmSpec = serde_json::from_str(spec).expect("spec");
    let code = kiln_vmm::process::child::run_child(&spec, Path::new(socket), Instant::now());
    std::process::exit(code);
}

fn spawn_child(spec: &VmSpec, socket: &Path) -> VmProcess {
    let mut cmd = kiln_e2e::helper_process::command(module_path!(), "vmm_child_entry");
    cmd.env(
        CHILD_ENV,
        format!(
            "{}\n{}",
            socket.display(),
            serde_json::to_string(spec).unwrap()
        ),
    );
    VmProcess::spawn_command(cmd, socket, false).expect("spawn the VMM child")
}

fn kernel(dir: &Path, forever: bool) -> std::path::PathBuf {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    for b in b"hello from the child\n" {
        a.mov(al, *b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
    if forever {
        a.pause().unwrap();
        a.jmp(top).unwrap();
    } else {
        a.mov(dx, 0x600u32).unwrap();
        a.mov(al, 0x34u32).unwrap();
        a.out(dx, al).unwrap();
        a.hlt().unwrap();
    }
    let code = a.assemble(0x10_0200).unwrap();
    let path = dir.join(if forever { "spin" } else { "hello" });
    std::fs::write(&path, bzimage_running(&code)).unwrap();
    path
}

fn spec(kernel: std::path::PathBuf, log: &Path) -> VmSpec {
    VmSpec {
        kernel,
        initrd: None,
        cmdline: Some("console=ttyS0".into()),
        disks: vec![],
        mem_size: 64 << 20,
        vcpus: 1,
        console_log: Some(log.to_path_buf()),
        console_terminal: false,
        ..VmSpec::default()
    }
}

#[test]
fn child_process_runs_the_vm_and_reports_poweroff() {
    if !kvm_or_skip("child_process_runs_the_vm_and_reports_poweroff") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut p = spawn_child(
        &spec(kernel(dir.path(), false), &log),
        &dir.path().join("s"),
    );
    match p.status().unwrap() {
        Response::Status { state, .. } => assert_eq!(state, VmState::Created),
        r => panic!("unexpected {r:?}"),
    }
    p.start().unwrap();
    assert_eq!(p.wait().unwrap(), ExitReason::Poweroff);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from the child\n"
    );
}

#[test]
fn child_process_pause_resume_stop() {
    if !kvm_or_skip("child_process_pause_resume_stop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut p = spawn_child(&spec(kernel(dir.path(), true), &log), &dir.path().join("s"));
    p.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let state = |p: &mut VmProcess| match p.status().unwrap() {
        Response::Status { state, .. } => state,
        r => panic!("unexpected {r:?}"),
    };
    assert_eq!(state(&mut p), VmState::Running);
    p.pause().unwrap();
    assert_eq!(state(&mut p), VmState::Paused);
    p.resume().unwrap();
    assert_eq!(state(&mut p), VmState::Running);
    assert_eq!(p.stop().unwrap(), ExitReason::Stopped);
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .starts_with("hello from the child\n"));
}

#[test]
fn a_child_that_dies_is_reported() {
    if !kvm_or_skip("a_child_that_dies_is_reported") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut p = spawn_child(&spec(kernel(dir.path(), true), &log), &dir.path().join("s"));
    p.start().unwrap();
    // SAFETY: sending SIGKILL to our own child process.
    unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
    match p.wait().unwrap() {
        ExitReason::VmmError { detail } => assert!(detail.contains("signal 9"), "{detail}"),
        r => panic!("unexpected {r:?}"),
    }
}

mod checkpoints {
    //! Live checkpoints through the child's checkpoint socket: a tiny guest writes through
    //! virtio-blk, the test detaches and attaches its disk as the step cache does, then lets
    //! the guest write more (a frame on its NIC is the go-ahead) and checks the layer and the
    //! fresh overlay on the host.

    use std::os::fd::IntoRawFd;
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use kiln_disk::OpenOptions;
    use kiln_e2e::virtio_guest::{Buf, Device, Script, VIRTIO_F_VERSION_1};
    use kiln_net::FramePort;
    use kiln_vmm::exit::ExitReason;
    use kiln_vmm::process::checkpoint::{CheckpointClient, CheckpointError, CheckpointSpec};
    use kiln_vmm::process::protocol::{DiskSpec, NicSpec};
    use kiln_vmm::process::{VmProcess, VmSpec};

    use super::CHILD_ENV;
    use crate::kvm_support::kvm_or_skip;

    const DISK_SIZE: u64 = 4 << 20;
    /// Written before the checkpoint, overwritten after it.
    const FIRST: u64 = 8;
    /// Written after the checkpoint only.
    const SECOND: u64 = 600;
    const NET_HDR: u32 = 12;

    fn sector(seed: u8) -> Vec<u8> {
        (0..512u32).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn write(s: &mut Script, q: &mut kiln_e2e::virtio_guest::Virtq, at: u64, data: &[u8]) {
        let d = s.place(data);
        let h = s.place(&header(1, at));
        let st = s.alloc(1, 1);
        s.write(1, st, 0xff, "status poison");
        s.submit(
            q,
            &[Buf::R(h, 16), Buf::R(d, 512), Buf::W(st, 1)],
            1,
            "write",
        );
        s.expect(1, st, 0, "write: status");
    }

    /// Writes `sector(1)` at FIRST, says so, waits for a frame, then writes `sector(2)` at
    /// FIRST and `sector(3)` at SECOND and powers off.
    fn script() -> Script {
        let mut s = Script::new(2);
        let (blk, net) = (Device::new(0), Device::new(1));
        let mut bq = s.virtq(blk, 0, 16);
        s.init_device(blk, 2, VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1, 256, &[&bq]);
        let mut rx = s.virtq(net, 0, 16);
        let tx = s.virtq(net, 1, 16);
        s.init_device(
            net,
            1,
            VIRTIO_F_VERSION_1,
            VIRTIO_F_VERSION_1,
            256,
            &[&rx, &tx],
        );
        let rb = s.alloc(u64::from(NET_HDR) + 1514, 64);
        s.add_chain(&mut rx, &[Buf::W(rb, NET_HDR + 1514)]);
        s.kick(&rx);
        write(&mut s, &mut bq, FIRST, &sector(1));
        s.print("first written\n");
        s.wait_used(&mut rx, 1, "the go-ahead frame");
        write(&mut s, &mut bq, FIRST, &sector(2));
        write(&mut s, &mut bq, SECOND, &sector(3));
        s.print("second written\n");
        s.end();
        s
    }

    fn read(path: &Path, at: u64) -> Vec<u8> {
        let d = kiln_disk::open(path, OpenOptions::read_only()).unwrap();
        let mut b = vec![0u8; 512];
        d.read_at(&mut b, at * 512).unwrap();
        b
    }

    fn clean(path: &Path) {
        let r = kiln_disk::check(path).unwrap();
        assert!(r.is_clean(), "{}: {r:?}", path.display());
        if let Ok(o) = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(path)
            .output()
        {
            assert!(
                o.status.success(),
                "qemu-img check {}: {o:?}",
                path.display()
            );
        } else {
            kiln_e2e::skip("qemu-img is not installed: the images are checked by kiln-disk only");
        }
    }

    fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "waited in vain for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_running_vms_disk_is_checkpointed_over_the_socket() {
        if !kvm_or_skip("a_running_vms_disk_is_checkpointed_over_the_socket") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let s = script();
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, s.elf()).unwrap();
        let top = dir.path().join("vm.qcow2");
        kiln_disk::create(
            &top,
            &kiln_disk::CreateOptions {
                size: Some(DISK_SIZE),
                ..Default::default()
            },
        )
        .unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(cache.join("tmp/stage")).unwrap();
        std::fs::create_dir_all(cache.join("layers/k1")).unwrap();
        let (gate, nic) = kiln_net::seqpacket_pair().unwrap();
        let nic_fd = nic.into_raw_fd();
        let log = dir.path().join("console.log");
        let ckpt = dir.path().join("ckpt.sock");
        let spec = VmSpec {
            kernel,
            mem_size: kiln_e2e::virtio_guest::GUEST_MEMORY,
            vcpus: 1,
            console_log: Some(log.clone()),
            disks: vec![DiskSpec::writable(&top)],
            nics: vec![NicSpec {
                mac: [2, 0, 0, 0, 0, 9],
                fd: nic_fd,
            }],
            checkpoint: Some(CheckpointSpec {
                socket: ckpt.clone(),
                layer_root: cache.clone(),
            }),
            ..VmSpec::default()
        };
        let socket = dir.path().join("s");
        let mut cmd = kiln_e2e::helper_process::command("it::kvm_process", "vmm_child_entry");
        cmd.env(
            CHILD_ENV,
            format!(
                "{}\n{}",
                socket.display(),
                serde_json::to_string(&spec).unwrap()
            ),
        );
        // SAFETY: between fork and exec only fcntl on a descriptor this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(nic_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut p = VmProcess::spawn_command(cmd, &socket, false).expect("spawn the VMM child");
        // SAFETY: the child has its copy; this process's copy is closed once.
        unsafe { libc::close(nic_fd) };
        p.start().unwrap();
        let console = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_for("the first write", || console().contains("first written"));

        let mut c = CheckpointClient::connect(&ckpt).unwrap();
        let refused = |r: Result<(), kiln_vmm::process::checkpoint::ClientError>| match r {
            Err(kiln_vmm::process::checkpoint::ClientError::Refused(e)) => e,
            r => panic!("not refused: {r:?}"),
        };
        let staged = cache.join("tmp/stage/disk.qcow2");
        assert_eq!(
            refused(c.detach(3, &staged)),
            CheckpointError::UnknownDisk { disk: 3, count: 1 }
        );
        assert!(matches!(
            refused(c.detach(0, &dir.path().join("elsewhere.qcow2"))),
            CheckpointError::OutsideRoot { .. }
        ));
        assert_eq!(
            refused(c.attach(0, &staged)),
            CheckpointError::NotDetached { disk: 0 }
        );
        // A connection lost while detached: the overlay goes back.
        let lost = cache.join("tmp/stage/lost.qcow2");
        c.detach(0, &lost).unwrap();
        assert!(lost.exists() && !top.exists());
        let mut c2 = CheckpointClient::connect(&ckpt).unwrap();
        assert_eq!(
            refused(c2.detach(0, &staged)),
            CheckpointError::AlreadyDetached { disk: 0 }
        );
        drop(c);
        wait_for("the lost connection's overlay to go back", || {
            match c2.detach(0, &staged) {
                Ok(()) => true,
                Err(kiln_vmm::process::checkpoint::ClientError::Refused(
                    CheckpointError::AlreadyDetached { .. },
                )) => false,
                Err(e) => panic!("{e}"),
            }
        });
        assert!(!lost.exists());
        // Moved on before the attach, as the step cache publishes a layer.
        let layer = cache.join("layers/k1/disk.qcow2");
        std::fs::rename(&staged, &layer).unwrap();
        c2.attach(0, &layer).unwrap();
        assert!(!console().contains("second written"));
        gate.send(&[0xffu8; 60]).unwrap();
        assert_eq!(p.wait().unwrap(), ExitReason::Poweroff);
        if let Err(e) = s.verdict(&console()) {
            panic!("{e}");
        }
        assert!(console().contains("second written"));

        // The layer holds exactly the first write; the overlay the rest, over the layer.
        assert_eq!(read(&layer, FIRST), sector(1));
        assert_eq!(read(&layer, SECOND), vec![0u8; 512]);
        assert_eq!(
            kiln_disk::backing_name(&top).unwrap().as_deref(),
            Some(std::fs::canonicalize(&layer).unwrap().to_str().unwrap())
        );
        assert_eq!(read(&top, FIRST), sector(2));
        assert_eq!(read(&top, SECOND), sector(3));
        clean(&layer);
        clean(&top);
    }
}
