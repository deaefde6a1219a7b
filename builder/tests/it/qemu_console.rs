//! A VM's console under the real qemu engine: a VM with a screen and a console (a blank disk,
//! a GRUB ISO as its CD-ROM, SeaBIOS) serves VNC on `vnc.sock` in its work folder behind the
//! one-time password in `vnc.pass`; a VNC client gets through with that password and sees a
//! screen, and is refused with another.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kiln_builder::engine::firmware::HostFirmware;
use kiln_builder::engine::qemu::{find_qemu, vnc_password_file, vnc_socket, QemuEngine};
use kiln_builder::engine::{BootMode, DiskAttach, Engine, FirmwareBoot, Peripherals, VmLaunch};
use kiln_builder::job::Firmware;
use kiln_e2e::rfb;

#[test]
fn a_build_vm_screen_is_served_over_vnc_with_its_one_time_password() {
    if find_qemu().is_none() {
        return kiln_e2e::skip("qemu-system-x86_64 is not installed");
    }
    if let Some(why) = kiln_e2e::iso::cannot_build() {
        return kiln_e2e::skip(why);
    }
    if let Err(e) = HostFirmware::find().files(Firmware::Bios) {
        return kiln_e2e::skip(format!("no SeaBIOS: {e}"));
    }
    let iso = kiln_e2e::iso::grub_iso(
        "set timeout=600\nmenuentry 'kiln console test' { halt }\n",
        &[],
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk = dir.join("blank.qcow2");
    kiln_builder::diskops::create_overlay(None, &disk, 16 << 20).unwrap();
    let vm = VmLaunch {
        name: "screen".into(),
        cpus: 1,
        memory_mib: 256,
        boot: BootMode::Firmware(FirmwareBoot {
            firmware: Firmware::Bios,
            nvram: None,
        }),
        cmdline_extra: vec![],
        disks: vec![DiskAttach {
            name: "root".into(),
            path: disk,
            read_only: false,
            bus: Default::default(),
        }],
        workdir: dir.join("run"),
        serial_log: dir.join("serial.log"),
        cid: 3,
        nics: vec![],
        peripherals: Peripherals {
            cdroms: vec![iso],
            screen: true,
            console: true,
            ..Default::default()
        },
    };
    let engine = QemuEngine::new().unwrap();
    let mut running = engine.launch(&vm).unwrap();

    let pass_file = vnc_password_file(&vm.workdir);
    let password = std::fs::read_to_string(&pass_file).unwrap();
    assert_eq!(password.len(), 8, "{password:?}");
    let mode = std::fs::metadata(&pass_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let sock = vnc_socket(&vm.workdir);
    let connect = || {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match UnixStream::connect(&sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return s;
                }
                Err(e) if Instant::now() < until && running_ok(&e) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!(
                    "no VNC server on {}: {e}\n{}",
                    sock.display(),
                    kiln_builder::engine::qemu::stderr_tail(&vm.workdir)
                ),
            }
        }
    };
    let h = rfb::handshake(&mut connect(), &password).unwrap();
    assert_eq!(h.version, "RFB 003.008");
    // VNC authentication only: never "None".
    assert_eq!(h.security_types, [rfb::VNC_AUTH]);
    let init = h.result.expect("the right password is accepted");
    assert!(init.width > 0 && init.height > 0, "{init:?}");
    assert!(init.name.contains("kiln-screen"), "{init:?}");

    let wrong: String = password
        .chars()
        .map(|c| if c == 'a' { 'b' } else { 'a' })
        .collect();
    let h = rfb::handshake(&mut connect(), &wrong).unwrap();
    assert!(h.result.is_err(), "a wrong password got in: {h:?}");
    // Still served after a refusal, to the right password.
    let h = rfb::handshake(&mut connect(), &password).unwrap();
    assert!(h.result.is_ok(), "{h:?}");
    running.kill();
}

/// Errors that mean QEMU has not made its socket yet.
fn running_ok(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}
