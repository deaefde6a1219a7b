//! kiln-vmm benchmark: prints
//! 1. time from VMM process start to the guest's first instruction (one VMM process per
//!    VM, as the kvm engine runs it: spawn, control socket, VM and vCPU setup, first exit),
//!    with a breakdown of the median run; the process is this benchmark's own binary, and
//!    also the `kiln` binary when `--kiln PATH` is given;
//! 2. the VMM process's resident memory with 1 vCPU and 256 MiB of guest memory;
//! 3. the MMIO-exit round trip (guest read of a virtio-mmio register, served by the bus
//!    and transport in user space), and the PIO-exit round trip for comparison.
//!
//! ```text
//! cargo bench -p kiln-vmm --bench bench [-- RUNS] [--kiln target/release/kiln]
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

/// One start-up: the child's marks relative to `t0` (the parent's clock just before
/// spawning), ending with the first guest exit.
struct Startup {
    total_ms: f64,
    marks: Vec<(String, f64)>,
}

fn one_startup(exe: &Path, spec: &VmSpec, socket: &Path) -> (Startup, VmProcess) {
    let t0 = monotonic_ns();
    let mut p = VmProcess::spawn(exe, spec, socket).expect("spawn VMM");
    p.start().expect("start");
    // Wait for the first exit to be recorded.
    let (first, phases) = loop {
        match p.status().expect("status") {
            Response::Status {
                first_exit_monotonic_ns: Some(ns),
                phases,
                ..
            } => break (ns, phases),
            Response::Exited { exit } => panic!("guest ended early: {exit}"),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let ms = |ns: u64| ns.saturating_sub(t0) as f64 / 1e6;
    let marks = phases.into_iter().map(|p| (p.name, ms(p.at_ns))).collect();
    (
        Startup {
            total_ms: ms(first),
            marks,
        },
        p,
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Spawn `exe __vmm --nop` (the process does nothing and exits) and wait: what process
/// creation, the dynamic loader and the runtime cost before any VM work.
fn bare_process_ms(exe: &Path, runs: usize) -> f64 {
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let s = std::process::Command::new(exe)
                .args([CHILD_ARG, "--nop"])
                .status()
                .expect("run --nop");
            assert!(s.success(), "{} __vmm --nop failed: {s}", exe.display());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&mut v)
}

fn process_metrics(exe: &Path, label: &str, runs: usize) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = spin_kernel(&dir);
    let size = std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0);
    println!(
        "VMM process: {label} ({}, {:.1} MiB)",
        exe.display(),
        size as f64 / (1 << 20) as f64
    );
    println!(
        "  bare process (`__vmm --nop`: spawn, exec, loader, exit; waited): median {:.2} ms",
        bare_process_ms(exe, runs)
    );
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
            ..VmSpec::default()
        };
        let (s, mut p) = one_startup(exe, &spec, &dir.join(format!("s{i}")));
        startup.push(s);
        std::thread::sleep(Duration::from_millis(100));
        if let Some(r) = rss_kib(p.pid()) {
            rss.push(r);
        }
        assert_eq!(p.stop().expect("stop"), ExitReason::Stopped);
    }
    let _ = std::fs::remove_dir_all(&dir);
    startup.sort_by(|a, b| a.total_ms.total_cmp(&b.total_ms));
    let med = &startup[startup.len() / 2];
    println!(
        "  process start -> first guest instruction: median {:.2} ms, min {:.2} ms, max {:.2} ms ({} runs; target < 10 ms)",
        med.total_ms,
        startup[0].total_ms,
        startup[startup.len() - 1].total_ms,
        runs
    );
    println!("  breakdown of the median run (ms since the parent called spawn; marks from the VMM process, threads marked as such):");
    println!("    {:>7.2}  spawn called", 0.0);
    for (name, at) in &med.marks {
        println!("    {at:>7.2}  {name}");
    }
    println!(
        "  median of each mark over all runs: {}",
        median_marks(&startup)
    );
    rss.sort();
    if let Some((total, anon, file)) = rss.get(rss.len() / 2) {
        println!(
            "  VMM resident memory, 1 vCPU, 256 MiB guest: {:.2} MiB (anon {:.2} MiB, file {:.2} MiB; includes the guest pages touched; target < 8 MiB)",
            *total as f64 / 1024.0,
            *anon as f64 / 1024.0,
            *file as f64 / 1024.0
        );
    }
}

/// "name=median" for the marks every run has.
fn median_marks(runs: &[Startup]) -> String {
    let names: Vec<&String> = runs[0].marks.iter().map(|(n, _)| n).collect();
    names
        .into_iter()
        .filter_map(|n| {
            let mut v: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.marks.iter().find(|(m, _)| m == n).map(|(_, t)| *t))
                .collect();
            (v.len() == runs.len()).then(|| format!("{n}={:.2}", median(&mut v)))
        })
        .collect::<Vec<_>>()
        .join(", ")
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
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == CHILD_ARG) {
        // Child mode, first thing in main as in `kiln`: `bench __vmm --socket S --spec JSON`.
        std::process::exit(kiln_vmm::process::child::main(&args[2..], || {}));
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut runs: usize = 20;
    let mut kiln_exe = None;
    // `cargo bench` passes `--bench`.
    let mut it = args.iter().skip(1).filter(|a| *a != "--bench");
    while let Some(a) = it.next() {
        if a == "--kiln" {
            kiln_exe = it.next().map(std::path::PathBuf::from);
        } else if let Ok(n) = a.parse() {
            runs = n;
        } else {
            eprintln!("usage: bench [RUNS] [--kiln PATH-TO-kiln]");
            std::process::exit(2);
        }
    }
    if !kiln_e2e::kvm_or_skip("bench") {
        return;
    }
    println!(
        "kiln-vmm benchmark ({}); load average {}",
        kiln_vmm::doctor::probe().vendor.describe(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    let exe = std::env::current_exe().unwrap();
    process_metrics(&exe, "this benchmark's own binary (`bench __vmm`)", runs);
    if let Some(k) = &kiln_exe {
        process_metrics(k, "the kiln binary (`kiln __vmm`)", runs);
    }
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
