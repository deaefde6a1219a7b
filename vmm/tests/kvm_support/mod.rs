//! Shared by the KVM tests: skip loudly without /dev/kvm, and run a tiny guest program.

#![allow(dead_code)]

use std::time::Duration;

use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};

/// True when /dev/kvm can be opened; otherwise prints why the test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: {test}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// Bound on how long any tiny guest may run (PVM emulates some supervisor instructions
/// slowly, but these programs need milliseconds).
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Outcome {
    pub reason: ExitReason,
    pub console: String,
}

/// Run `segments` in `mode` on `vcpus` vCPUs until the VM ends.
pub fn run_program(segments: Vec<(u64, Vec<u8>)>, mode: BootMode, vcpus: u8) -> Outcome {
    let config = VmConfig::builder()
        .memory(64 << 20)
        .vcpus(vcpus)
        .program(segments, mode)
        .capture_console(true)
        .build()
        .expect("config");
    let mut m = Machine::start(config).expect("start VM");
    let reason = match m.wait_timeout(TIMEOUT) {
        Some(r) => r,
        None => {
            let console = String::from_utf8_lossy(&m.console_output()).to_string();
            m.stop();
            panic!("guest did not end within {TIMEOUT:?}; console so far: {console:?}");
        }
    };
    Outcome {
        reason,
        console: String::from_utf8_lossy(&m.console_output()).to_string(),
    }
}

/// A bzImage: one setup sector after the boot sector, then the protected-mode part.
pub fn fake_bzimage(protected_mode: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    img.extend_from_slice(protected_mode);
    img
}

/// A bzImage whose 64-bit entry runs `program` (assembled for 0x10_0200).
pub fn bzimage_running(program: &[u8]) -> Vec<u8> {
    let mut pm = vec![0x90u8; 0x200];
    pm.extend_from_slice(program);
    fake_bzimage(&pm)
}
