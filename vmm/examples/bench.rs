//! kiln-vmm benchmark: prints
//! 1. time from VMM process start to the guest's first instruction (one VMM process per
//!    VM, as the kvm engine runs it: spawn, control socket, VM and vCPU setup, first exit);
//! 2. the VMM process's resident memory with 1 vCPU and 256 MiB of guest memory;
//! 3. the MMIO-exit round trip (guest read of a virtio-mmio register, served by the bus
//!    and transport in user space), and the PIO-exit round trip for comparison.
//!
//! ```text
//! cargo run --release -p kiln-vmm --example bench [-- ITERATIONS]
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};
use kiln_vmm::process::protocol::monotonic_ns;
use kiln_vmm::process::{Response, VmProcess, VmSpec};
use kiln_vmm::transport::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice};

const CHILD_ARG: &str = "__vmm";

/// A bzImage whose 64-bit entry prints one byte and then spins with `pause` (a running
/// guest that needs no exits).
fn spin_kernel(dir: &Path) -> std::path::PathBuf {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.out(dx, al).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.pause().unwrap();
    a.jmp(top).unwrap();
    let code = a.assemble(0x10_0200).unwrap();
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1;
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    img.extend_from_slice(&[0x90; 0x200]);
    img.extend_from_slice(&code);
    let p = dir.join("spin-bzImage");
    std::fs::write(&p, img).unwrap();
    p
}

fn rss_kib(pid: u32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?))
}

fn process_metrics(runs: usize) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = spin_kernel(&dir);
    let exe = std::env::current_exe().unwrap();
    let mut startup = Vec::new();
    let mut rss = Vec::new();
    for i in 0..runs {
        let spec = VmSpec {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            disks: vec![],
            mem_size: 256 << 20,
            vcpus: 1,
            console_log: Some(dir.join("console.log")),
            console_terminal: false,
        };
        let socket = dir.join(format!("s{i}"));
        let t0 = monotonic_ns();
        let mut p = VmProcess::spawn(&exe, &spec, &socket).expect("spawn VMM");
        p.start().expect("start");
        // Wait for the first exit to be recorded.
        let first = loop {
            match p.status().expect("status") {
                Response::Status {
                    first_exit_monotonic_ns: Some(ns),
                    ..
                } => break ns,
                Response::Exited { exit } => panic!("guest ended early: {exit}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        startup.push((first.saturating_sub(t0)) as f64 / 1e6);
        std::thread::sleep(Duration::from_millis(100));
        if let Some(r) = rss_kib(p.pid()) {
            rss.push(r);
        }
        assert_eq!(p.stop().expect("stop"), ExitReason::Stopped);
    }
    let _ = std::fs::remove_dir_all(&dir);
    startup.sort_by(|a, b| a.total_cmp(b));
    println!(
        "process start -> first guest instruction: median {:.2} ms, min {:.2} ms, max {:.2} ms ({} runs; target < 10 ms)",
        startup[startup.len() / 2],
        startup[0],
        startup[startup.len() - 1],
        runs
    );
    rss.sort();
    if let Some((total, anon, file)) = rss.get(rss.len() / 2) {
        println!(
            "VMM resident memory, 1 vCPU, 256 MiB guest: {:.2} MiB (anon {:.2} MiB, file {:.2} MiB; includes the guest pages touched; target < 8 MiB)",
            *total as f64 / 1024.0,
            *anon as f64 / 1024.0,
            *file as f64 / 1024.0
        );
    }
}

struct Idle;
impl VirtioDevice for Idle {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data)
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// Run `n` exits of one kind and return the mean round trip.
fn exit_round_trip(n: u32, mmio: bool) -> Duration {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, 0xd000_0000u64).unwrap();
    a.mov(ecx, n).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    if mmio {
        a.mov(eax, dword_ptr(rbx)).unwrap(); // MagicValue
    } else {
        a.mov(dx, 0x3fdu32).unwrap(); // serial line status
        a.in_(al, dx).unwrap();
    }
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.mov(al, 0x34u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let config = VmConfig::builder()
        .memory(64 << 20)
        .program(
            vec![(0x10_0000, code)],
            BootMode::Long {
                rip: 0x10_0000,
                rsi: 0,
            },
        )
        .device(Box::new(Idle))
        .build()
        .unwrap();
    let mut m = Machine::start(config).unwrap();
    let reason = m.wait();
    let end = Instant::now();
    assert_eq!(reason, ExitReason::Poweroff);
    let first = m.first_exit().expect("exits happened");
    (end - first) / n
}

/// Machine::start to the first exit, in this process (no spawn, no socket).
fn in_process_startup(runs: usize) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = spin_kernel(&dir);
    let mut v = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let config = VmConfig::builder()
            .memory(256 << 20)
            .kernel(&kernel)
            .build()
            .unwrap();
        let mut m = Machine::start(config).unwrap();
        let setup = m.vcpus_started - t0;
        let first = loop {
            if let Some(f) = m.first_exit() {
                break f;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        v.push(((first - t0).as_secs_f64() * 1e3, setup.as_secs_f64() * 1e3));
        m.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (total, setup) = v[v.len() / 2];
    println!(
        "in-process Machine::start -> first guest instruction: median {total:.2} ms (VM setup before the vCPU thread starts: {setup:.2} ms)"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        // Child mode: `bench __vmm --socket S --spec JSON`.
        let born = Instant::now();
        let socket = std::path::PathBuf::from(&args[3]);
        let spec: VmSpec = serde_json::from_str(&args[5]).expect("spec");
        let code = kiln_vmm::process::child::run_child(&spec, &socket, born);
        std::process::exit(code);
    }
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    println!(
        "kiln-vmm benchmark ({})",
        kiln_vmm::doctor::probe().vendor.describe()
    );
    process_metrics(runs);
    in_process_startup(runs);
    let n = 20_000;
    let mmio = exit_round_trip(n, true);
    let pio = exit_round_trip(n, false);
    println!(
        "MMIO-exit round trip (virtio-mmio register read): {:.2} us mean over {n}",
        mmio.as_secs_f64() * 1e6
    );
    println!(
        "PIO-exit round trip (serial status read): {:.2} us mean over {n}",
        pio.as_secs_f64() * 1e6
    );
}
