//! A boot command typed into a real QEMU through kiln's typing and QMP control client, without
//! a kiln build: a GRUB ISO waits at its menu, the boot command edits the entry's `linux`
//! line (`e`, arrows, `<end>`, text with `{{ .HTTPIP }}`/`{{ .HTTPPort }}`, Ctrl-X), and the
//! kernel it boots prints the command line it got. The screenshots are real PNGs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_builder::build::boot_command::{actions, HttpAddr, Typist};
use kiln_builder::manifest::boot::parse;
use kiln_e2e::initramfs::Initramfs;
use kiln_e2e::kernel::{package_kernel, GENERIC_METAPACKAGE};
use kiln_e2e::qemu::{Qemu, QemuConfig};

/// A menu that waits forever. GRUB's editor shows `setparams 'kiln-keys'` and the empty line
/// after the `{` first, then the two lines before `linux`: four arrows down reach it.
/// The `linux` line is short so the typed text does not wrap it: GRUB redraws a wrapped entry
/// after each key, which under TCG on a busy host takes longer than the key interval, and the
/// keys sent meanwhile overflow the keyboard's queue.
const GRUB_CFG: &str = "serial --unit=0 --speed=115200\nterminal_input serial console\n\
terminal_output serial console\nset timeout=-1\nmenuentry 'kiln-keys' {\n  echo loading\n  \
set kiln=1\n  linux /k/vmlinuz console=ttyS0 no_timer_check\n  initrd /k/initrd\n}\n";

const BOOT_COMMAND: &str =
    "e<down><down><down><down><end> url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/answers<leftCtrlOn>x<leftCtrlOff>";

/// The width and height in a PNG's IHDR chunk, if `data` is a PNG.
fn png_size(data: &[u8]) -> Option<(u32, u32)> {
    if data.len() < 24 || &data[..8] != b"\x89PNG\r\n\x1a\n" || &data[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(data[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(data[20..24].try_into().ok()?);
    Some((w, h))
}

#[test]
fn a_boot_command_edits_a_grub_entry_in_a_real_qemu() {
    if let Some(why) = kiln_e2e::iso::cannot_build() {
        return kiln_e2e::skip(format!("cannot make an ISO: {why}"));
    }
    if !kiln_e2e::qemu::qemu_available() {
        return kiln_e2e::skip("qemu-system-x86_64 is not installed");
    }
    let kernel = match package_kernel(GENERIC_METAPACKAGE) {
        Ok(k) => k,
        Err(e) => return kiln_e2e::skip(format!("no generic kernel: {e}")),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let initrd = dir.join("initrd");
    Initramfs::new()
        .busybox()
        .init_script("echo \"KILN-CMDLINE: $(cat /proc/cmdline)\"\npoweroff -f\n")
        .build(&initrd)
        .unwrap();
    let iso = kiln_e2e::iso::grub_iso(
        GRUB_CFG,
        &[("/k/vmlinuz", &kernel.vmlinuz), ("/k/initrd", &initrd)],
    )
    .unwrap();
    let control = dir.join("control.sock");
    let cfg = QemuConfig::firmware(&dir.join("serial.log")).arg([
        "-machine".to_string(),
        "graphics=off".into(),
        "-vga".into(),
        "std".into(),
        "-drive".into(),
        format!(
            "if=none,id=cd0,media=cdrom,readonly=on,format=raw,file={}",
            iso.display()
        ),
        "-device".into(),
        "ide-cd,bus=ide.0,drive=cd0,bootindex=0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", control.display()),
    ]);
    let mut qemu = Qemu::spawn(&cfg).unwrap();
    qemu.wait_for("kiln-keys", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("no GRUB menu: {e}"));

    let http = HttpAddr {
        ip: Ipv4Addr::new(10, 0, 2, 1),
        port: 8080,
    };
    let typed = actions(&parse(BOOT_COMMAND).unwrap(), Some(http)).unwrap();
    let shots = std::sync::Mutex::new(Vec::new());
    let typist = Typist {
        socket: control,
        logs: dir.to_path_buf(),
        vm: "keys".into(),
        // GRUB redraws the line after each key, slowly under TCG on a busy host; keys sent
        // faster than it reads them overflow the keyboard's queue and are lost.
        key_interval: Duration::from_millis(200),
        cancelled: &|| false,
        screenshot: &|p: &Path| shots.lock().unwrap().push(p.to_path_buf()),
    };
    let start = Instant::now();
    typist.type_actions(&typed).unwrap();
    eprintln!("typed {} key presses in {:?}", typed.len(), start.elapsed());

    let line = qemu
        .wait_for("KILN-CMDLINE:", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("the edited entry did not boot: {e}"));
    assert!(
        line.ends_with("no_timer_check url=http://10.0.2.1:8080/answers"),
        "{line}\n{}",
        qemu.output()
    );

    // Before the first key and when typing ended.
    let shots = shots.into_inner().unwrap();
    assert_eq!(
        shots,
        vec![dir.join("keys-boot-00.png"), dir.join("keys-boot-01.png")]
    );
    for s in &shots {
        let data = std::fs::read(s).unwrap();
        let (w, h) = png_size(&data).unwrap_or_else(|| panic!("{} is no PNG", s.display()));
        assert!(w >= 640 && h >= 400, "{}: {w}x{h}", s.display());
    }
}
