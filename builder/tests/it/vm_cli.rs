//! `kiln doctor [--json]` and `kiln vm run` driven like a user would. `vm run` boots a tiny
//! hand-assembled bzImage (it prints a line on COM1 and powers off through the ACPI port)
//! in the VMM child process (`kiln __vmm`), so it runs on any usable /dev/kvm, PVM included.

use std::path::Path;
use std::process::Command;

fn kiln(args: &[&str]) -> (String, String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// 64-bit code at the bzImage's `startup_64`: write `text` to port 0x3f8, then ACPI S5.
fn program(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0x06]); // mov dx, 0x600
    c.extend_from_slice(&[0xb0, 0x34, 0xee]); // mov al, 0x34 (SLP_TYP 5 | SLP_EN); out dx, al
    c.push(0xf4); // hlt
    c
}

/// A minimal bzImage (boot protocol 2.15, 64-bit entry at +0x200 of the kernel proper).
fn bzimage(dir: &Path, text: &[u8]) -> std::path::PathBuf {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img.extend_from_slice(&[0x90; 0x200]);
    img.extend_from_slice(&program(text));
    let p = dir.join("tiny-bzImage");
    std::fs::write(&p, img).expect("write kernel");
    p
}

#[test]
fn doctor_prints_the_probe_as_text_and_json() {
    let (text, err, code) = kiln(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.trim().is_empty());
    let (json, err, code) = kiln(&["doctor", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("doctor --json is JSON");
    let engine = v["recommended_engine"]
        .as_str()
        .expect("recommended_engine is a string");
    assert!(
        ["kvm", "qemu"].contains(&engine.to_ascii_lowercase().as_str()),
        "{engine}"
    );
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    // The text report says the same engine.
    assert!(
        text.to_ascii_lowercase()
            .contains(&engine.to_ascii_lowercase()),
        "{text}"
    );
}

#[test]
fn vm_run_boots_a_kernel_with_every_flag() {
    if !kvm_usable() {
        kiln_e2e::skip("vm_run_boots_a_kernel_with_every_flag: /dev/kvm cannot be opened");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = bzimage(dir.path(), b"tiny guest says hi\n");
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, vec![0x5a; 4096]).expect("initrd");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let disk2 = dir.path().join("disk2.raw");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).expect("disk");
    let log = dir.path().join("console.log");
    let p = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (stdout, stderr, code) = kiln(&[
        "vm",
        "run",
        "--kernel",
        &p(&kernel),
        "--initrd",
        &p(&initrd),
        "--cmdline",
        "console=ttyS0 quiet",
        "--disk",
        &p(&disk),
        "--disk",
        &p(&disk2),
        "--mem",
        "64M",
        "--cpus",
        "2",
        "--console",
        "--console-log",
        &p(&log),
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("powered off"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&log).expect("console log"),
        "tiny guest says hi\n"
    );
    // --console copies the serial console to the terminal too.
    assert!(stdout.contains("tiny guest says hi"), "{stdout}");
}

#[test]
fn vm_run_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, err, code) = kiln(&["vm", "run", "--kernel", "/nonexistent/k", "--mem", "12X"]);
    assert_ne!(code, 0);
    assert!(err.contains("--mem"), "{err}");
    if !kvm_usable() {
        kiln_e2e::skip(
            "vm_run_refuses_bad_input_clearly (missing kernel part): /dev/kvm cannot be opened",
        );
        return;
    }
    let log = dir.path().join("c.log");
    let (_, err, code) = kiln(&[
        "vm",
        "run",
        "--kernel",
        "/nonexistent/kernel",
        "--mem",
        "64M",
        "--console-log",
        log.to_str().expect("utf-8"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/kernel"), "{err}");
}
