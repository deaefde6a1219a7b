//! Direct kernel boot through kiln's loader on real KVM, with a synthetic bzImage whose
//! "kernel" is a tiny 64-bit program: kiln loads it with linux-loader, writes the zero page,
//! command line, initrd, e820 map and ACPI tables, and enters it at `startup_64` (load
//! address + 0x200) in long mode with RSI pointing at the zero page, as a real kernel is
//! entered. The program reads the boot parameters back and prints them.
//!
//! The opt-in `stock_kernel_boots_to_busybox` boots a real kernel from `KILN_TEST_KERNEL`.

use std::io::Write;

use crate::kvm_support::{fake_bzimage, kvm_or_skip, TIMEOUT};
use iced_x86::code_asm::*;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};

fn kernel_program() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    // The command line, NUL-terminated, at boot_params.hdr.cmd_line_ptr (0x228).
    a.mov(ecx, dword_ptr(rsi + 0x228)).unwrap();
    let mut next = a.create_label();
    let mut end = a.create_label();
    a.set_label(&mut next).unwrap();
    a.mov(al, byte_ptr(rcx)).unwrap();
    a.test(al, al).unwrap();
    a.jz(end).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rcx).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut end).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    // e820_entries (0x1e8) as a digit.
    a.movzx(eax, byte_ptr(rsi + 0x1e8)).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.out(dx, al).unwrap();
    // The first four bytes of the initrd (hdr.ramdisk_image, 0x218).
    a.mov(ecx, dword_ptr(rsi + 0x218)).unwrap();
    for i in 0..4 {
        a.mov(al, byte_ptr(rcx + i)).unwrap();
        a.out(dx, al).unwrap();
    }
    // The RSDP signature at boot_params.acpi_rsdp_addr (0x70).
    a.mov(rcx, qword_ptr(rsi + 0x70)).unwrap();
    for i in 0..4 {
        a.mov(al, byte_ptr(rcx + i)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0x34u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0200).unwrap();
    let mut pm = vec![0x90u8; 0x200]; // startup_32 would be here; kiln enters at 0x200
    pm.extend_from_slice(&code);
    pm
}

#[test]
fn bzimage_direct_boot_sees_its_boot_parameters() {
    if !kvm_or_skip("bzimage_direct_boot_sees_its_boot_parameters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, fake_bzimage(&kernel_program())).unwrap();
    let initrd = dir.path().join("initrd");
    let mut f = std::fs::File::create(&initrd).unwrap();
    f.write_all(b"INIT").unwrap();
    f.write_all(&vec![0x5a; 100_000]).unwrap();
    drop(f);
    let config = VmConfig::builder()
        .memory(128 << 20)
        .kernel(&kernel)
        .initrd(&initrd)
        .cmdline("console=ttyS0 kiln.test=1")
        .capture_console(true)
        .build()
        .unwrap();
    let mut m = Machine::start(config).unwrap();
    let reason = m.wait_timeout(TIMEOUT);
    let console = String::from_utf8_lossy(&m.console_output()).to_string();
    assert_eq!(reason, Some(ExitReason::Poweroff), "console: {console:?}");
    assert_eq!(console, "console=ttyS0 kiln.test=1\n3INITRSD \n");
}

/// An ELF vmlinux with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) whose code is `code32`,
/// loaded at 1 MiB.
fn pvh_elf(code32: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let phdr = |f: &mut Vec<u8>, at: usize, ty: u32, off: u64, paddr: u64, size: u64| {
        f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        f[at + 4..at + 8].copy_from_slice(&7u32.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&paddr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        f[at + 48..at + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    };
    phdr(&mut f, 64, 1, 0x1000, 0x10_0000, code32.len() as u64); // PT_LOAD
    phdr(&mut f, 120, 4, 0x200, 0, 24); // PT_NOTE
    let note = &mut f[0x200..0x218];
    note[0..4].copy_from_slice(&4u32.to_le_bytes()); // namesz
    note[4..8].copy_from_slice(&8u32.to_le_bytes()); // descsz
    note[8..12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note[12..16].copy_from_slice(b"Xen\0");
    note[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f.extend_from_slice(code32);
    f
}

#[test]
fn elf_kernel_with_pvh_note_enters_in_protected_mode() {
    if !kvm_or_skip("elf_kernel_with_pvh_note_enters_in_protected_mode") {
        return;
    }
    // 32-bit code: EBX is the hvm_start_info. Print 'P' if its magic is right, the
    // command line from cmdline_paddr, and the memory map's entry count.
    let mut a = CodeAssembler::new(32).unwrap();
    let mut bad = a.create_label();
    let mut next = a.create_label();
    let mut end = a.create_label();
    let mut off = a.create_label();
    a.mov(dx, 0x3f8u32).unwrap();
    a.cmp(dword_ptr(ebx), 0x336e_c578).unwrap();
    a.jne(bad).unwrap();
    a.mov(al, b'P' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(esi, dword_ptr(ebx + 24)).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(al, byte_ptr(esi)).unwrap();
    a.test(al, al).unwrap();
    a.jz(end).unwrap();
    a.out(dx, al).unwrap();
    a.inc(esi).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut end).unwrap();
    a.mov(eax, dword_ptr(ebx + 48)).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(off).unwrap();
    a.set_label(&mut bad).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.set_label(&mut off).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0x34u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let config = VmConfig::builder()
        .memory(64 << 20)
        .kernel(&kernel)
        .cmdline("pvh=yes")
        .capture_console(true)
        .build()
        .unwrap();
    let mut m = Machine::start(config).unwrap();
    let reason = m.wait_timeout(TIMEOUT);
    let console = String::from_utf8_lossy(&m.console_output()).to_string();
    assert_eq!(reason, Some(ExitReason::Poweroff), "console: {console:?}");
    assert_eq!(console, "Ppvh=yes3");
}

#[test]
fn bad_kernels_are_refused_with_a_clear_error() {
    if !kvm_or_skip("bad_kernels_are_refused_with_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("junk");
    std::fs::write(&kernel, vec![0u8; 8192]).unwrap();
    let config = VmConfig::builder()
        .memory(64 << 20)
        .kernel(&kernel)
        .build()
        .unwrap();
    let err = Machine::start(config)
        .err()
        .expect("junk is refused")
        .to_string();
    assert!(err.contains("junk"), "{err}");
    let config = VmConfig::builder()
        .memory(64 << 20)
        .kernel(dir.path().join("missing"))
        .build()
        .unwrap();
    let err = Machine::start(config)
        .err()
        .expect("missing is refused")
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

/// Boots `KILN_TEST_KERNEL` (with `KILN_TEST_INITRD`, whose init must print
/// `KILN_TEST_MARKER` and power off) on kiln's VMM. Runs where a stock kernel can run
/// (hardware KVM); skipped, saying why, elsewhere.
#[test]
fn stock_kernel_boots_to_busybox() {
    let Some(kernel) = std::env::var_os("KILN_TEST_KERNEL") else {
        kiln_e2e::skip("stock_kernel_boots_to_busybox: KILN_TEST_KERNEL is not set");
        return;
    };
    let probe = kiln_vmm::doctor::probe();
    if !probe.stock_kernel_ok {
        kiln_e2e::skip(format_args!(
            "stock_kernel_boots_to_busybox: this host cannot run a stock kernel on KVM: {}",
            probe.reason
        ));
        return;
    }
    let marker = std::env::var("KILN_TEST_MARKER").unwrap_or_else(|_| "KILN-BOOT-OK".into());
    let mut b = VmConfig::builder()
        .memory(512 << 20)
        .vcpus(2)
        .kernel(kernel)
        .cmdline("console=ttyS0 panic=-1 reboot=k rdinit=/init")
        .capture_console(true);
    let dir = tempfile::tempdir().unwrap();
    let initrd = match std::env::var_os("KILN_TEST_INITRD") {
        Some(i) => std::path::PathBuf::from(i),
        None => busybox_initramfs(dir.path(), &marker),
    };
    b = b.initrd(initrd);
    let mut m = Machine::start(b.build().unwrap()).unwrap();
    let reason = m.wait_timeout(std::time::Duration::from_secs(120));
    let console = String::from_utf8_lossy(&m.console_output()).to_string();
    assert!(
        console.contains(&marker),
        "marker missing; console:\n{console}"
    );
    assert_eq!(reason, Some(ExitReason::Poweroff), "console:\n{console}");
}

/// A newc initramfs with busybox-static as /bin/busybox and an /init that prints `marker`
/// and powers off (through the FADT's sleep register: ACPI S5).
fn busybox_initramfs(dir: &std::path::Path, marker: &str) -> std::path::PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static (scripts/packages.txt) provides /bin/busybox");
    let init = root.join("init");
    std::fs::write(
        &init,
        format!("#!/bin/busybox sh\n/bin/busybox echo {marker}\n/bin/busybox poweroff -f\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initramfs.cpio");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success(), "cpio failed");
    out
}
