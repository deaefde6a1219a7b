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
