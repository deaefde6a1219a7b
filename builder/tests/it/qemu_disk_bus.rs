//! Disks on `scsi` and `sata` under a real QEMU, without a guest: the qemu engine's command
//! line with kiln-disk's NBD exports behind it, QEMU's own block layer (HMP `qemu-io`) writing
//! through virtio-scsi's and AHCI's drives, then the exports stopped and the qcow2 files
//! checked. The guest side of `sata` needs a kernel with AHCI, which the Debian cloud kernel
//! lacks; the e2e build test covers `scsi` in a guest.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_builder::engine::qemu::{backends, find_qemu, qemu_args, BlockMode};
use kiln_builder::engine::BootMode;
use kiln_builder::engine::{DiskAttach, VmLaunch};
use kiln_builder::job::DiskBus;
use kiln_builder::sources::BootFiles;

const SIZE: u64 = 16 << 20;

/// Sends one QMP command and returns its `return` (skipping events), with the lines QEMU
/// printed meanwhile on the same stdout (HMP `qemu-io` prints there, not in its reply).
fn qmp(
    to: &mut impl Write,
    from: &mut impl BufRead,
    cmd: serde_json::Value,
) -> (serde_json::Value, String) {
    writeln!(to, "{cmd}").unwrap();
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        assert!(from.read_line(&mut line).unwrap() > 0, "QMP closed");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            printed.push_str(&line);
            continue;
        };
        if let Some(r) = v.get("return") {
            return (r.clone(), printed);
        }
        assert!(v.get("error").is_none(), "{cmd}: {v}");
    }
}

#[test]
fn qemu_writes_scsi_and_sata_disks_through_kiln_disk() {
    let Some(qemu) = find_qemu() else {
        kiln_e2e::skip("qemu-system-x86_64 is not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut disks = Vec::new();
    for (name, bus) in [("data", DiskBus::Scsi), ("old", DiskBus::Sata)] {
        let path = dir.join(format!("{name}.qcow2"));
        kiln_builder::diskops::create_overlay(None, &path, SIZE).unwrap();
        disks.push(DiskAttach {
            name: name.into(),
            path,
            read_only: false,
            bus,
        });
    }
    let vm = VmLaunch {
        name: "buses".into(),
        cpus: 1,
        memory_mib: 128,
        boot: BootMode::Direct(BootFiles {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            root: "/dev/vda".into(),
            args: vec![],
        }),
        cmdline_extra: vec![],
        disks,
        workdir: dir.join("run"),
        serial_log: dir.join("serial.log"),
        cid: 3,
        peripherals: Default::default(),
        nics: vec![],
    };
    vm.create_workdir().unwrap();
    let mut b = backends::start(&vm, BlockMode::VhostUser).unwrap();
    for i in 0..2 {
        let sock = backends::nbd_socket(&vm.workdir, i);
        let mode = std::os::unix::fs::PermissionsExt::mode(&sock.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", sock.display());
    }
    // No guest runs: the kernel options go, QEMU stays stopped (-S) and only its block layer
    // is used.
    let mut args: Vec<OsString> = Vec::new();
    let mut it = qemu_args(&vm, BlockMode::VhostUser, None, &Default::default())
        .unwrap()
        .into_iter();
    while let Some(a) = it.next() {
        if a == "-kernel" || a == "-initrd" || a == "-append" {
            it.next();
        } else {
            args.push(a);
        }
    }
    let mut child = Command::new(qemu)
        .args(&args)
        .args(["-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    qmp(
        &mut to,
        &mut from,
        serde_json::json!({"execute": "qmp_capabilities"}),
    );
    let hmp = |to: &mut _, from: &mut _, line: &str| {
        let (r, printed) = qmp(
            to,
            from,
            serde_json::json!({"execute": "human-monitor-command",
                "arguments": {"command-line": line}}),
        );
        format!("{}{printed}", r.as_str().unwrap_or_default())
    };
    let tree = hmp(&mut to, &mut from, "info qtree");
    assert!(
        tree.contains("dev: scsi-hd") && tree.contains("serial = \"data\""),
        "{tree}"
    );
    assert!(
        tree.contains("dev: ide-hd") && tree.contains("serial = \"old\""),
        "{tree}"
    );
    // Written as the guest's drives write (the devices' own block backends, found by their
    // nodes), so the devices' permissions apply.
    let (blocks, _) = qmp(
        &mut to,
        &mut from,
        serde_json::json!({"execute": "query-block"}),
    );
    for (node, byte) in [("d0", 0x5a), ("d1", 0xa5)] {
        let dev = blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["inserted"]["node-name"] == node)
            .and_then(|b| b["qdev"].as_str())
            .unwrap_or_else(|| panic!("no device on {node}: {blocks}"))
            .to_string();
        let out = hmp(
            &mut to,
            &mut from,
            &format!("qemu-io -d {dev} \"write -P {byte} 1M 64k\""),
        );
        assert!(out.contains("wrote 65536/65536 bytes"), "{node}: {out}");
    }
    qmp(&mut to, &mut from, serde_json::json!({"execute": "quit"}));
    assert!(child.wait().unwrap().success());
    // QEMU gone: the exports flush and remove their sockets.
    b.stop();
    for i in 0..2 {
        assert!(!backends::nbd_socket(&vm.workdir, i).exists());
    }
    for (d, byte) in vm.disks.iter().zip([0x5au8, 0xa5]) {
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(&d.path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        assert_eq!(
            read_at(&d.path, 1 << 20, 65536),
            vec![byte; 65536],
            "{}",
            d.name
        );
        assert_eq!(read_at(&d.path, 0, 4096), vec![0; 4096], "{}", d.name);
    }
}

/// `len` bytes at `offset` of a qcow2 image, read through kiln-disk.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let dev = kiln_disk::open(path, kiln_disk::OpenOptions::read_only()).unwrap();
    let mut buf = vec![0; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}
