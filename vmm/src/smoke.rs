//! The smoke test behind `kiln doctor` and `--engine auto`: boot a stock kernel with a tiny
//! initramfs in kiln's VMM (its own process, as the kvm engine runs it) and watch the serial
//! console for a line only userspace writes. The probe ([`crate::doctor`]) reads CPU flags
//! and capabilities; this shows the VMM really runs an unmodified kernel on this host.
//!
//! The initramfs holds `/dev/console` and `/init`, a 200-byte static x86-64 program written
//! here byte by byte: it writes [`MARKER`] to its stdout (the console) and powers off. No
//! toolchain, agent binary or busybox is needed to make it.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::process::{VmProcess, VmSpec};

/// The line `/init` writes: its presence on the console means the kernel ran userspace.
pub const MARKER: &str = "kiln-smoke: userspace reached";

/// How long a smoke boot may take; real KVM needs well under a second.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Console lines kept in an outcome, for a failure's explanation.
const TAIL_LINES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    #[error("writing the smoke-test initramfs {path}: {source}")]
    Initramfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What one smoke boot showed.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeOutcome {
    pub passed: bool,
    /// One line: how long userspace took, or why it was not reached.
    pub reason: String,
    pub seconds: f64,
    /// The last lines of the serial console.
    pub console_tail: String,
}

const BASE: u64 = 0x40_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

/// `/init`: a static ELF that writes `text` to fd 1 and then calls `final_call` (a syscall
/// number and its three arguments): reboot(POWER_OFF) in the guest, exit in unit tests.
fn init_program(text: &[u8], final_call: [u32; 4]) -> Vec<u8> {
    let code_at = EHDR + PHDR;
    let mut code: Vec<u8> = Vec::new();
    code.extend_from_slice(&[0xb8, 1, 0, 0, 0]); // mov eax, 1 (write)
    code.extend_from_slice(&[0xbf, 1, 0, 0, 0]); // mov edi, 1
    let lea_at = code.len();
    code.extend_from_slice(&[0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip + text]
    code.push(0xba); // mov edx, len
    code.extend_from_slice(&(text.len() as u32).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    for (op, v) in [0xb8u8, 0xbf, 0xbe, 0xba].into_iter().zip(final_call) {
        code.push(op); // mov eax / edi / esi / edx, imm32
        code.extend_from_slice(&v.to_le_bytes());
    }
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp . (reboot does not return)
    let rel = (code.len() - (lea_at + 7)) as u32;
    code[lea_at + 3..lea_at + 7].copy_from_slice(&rel.to_le_bytes());
    code.extend_from_slice(text);

    let total = (code_at + code.len()) as u64;
    let mut elf = Vec::with_capacity(total as usize);
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + code_at as u64).to_le_bytes()); // entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&0u64.to_le_bytes()); // the whole file
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&total.to_le_bytes());
    elf.extend_from_slice(&total.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    elf
}

/// reboot(LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF).
const POWER_OFF: [u32; 4] = [169, 0xfee1_dead, 0x2812_1969, 0x4321_fedc];

/// One newc cpio entry, owned by root (also kiln's bootstrap initramfs).
pub fn cpio_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The smoke test's initramfs (newc cpio): `/dev/console` (so `/init` starts with the
/// console as stdout even on kernels without a built-in initramfs) and `/init`.
pub fn initramfs() -> Vec<u8> {
    let mut out = Vec::new();
    cpio_entry(&mut out, 1, "dev", 0o040755, (0, 0), &[]);
    cpio_entry(&mut out, 2, "dev/console", 0o020600, (5, 1), &[]);
    let marker = format!("\n{MARKER}\n");
    let init = init_program(marker.as_bytes(), POWER_OFF);
    cpio_entry(&mut out, 3, "init", 0o100755, (0, 0), &init);
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// The kernel command line of a smoke boot.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 rdinit=/init";

/// Boot `kernel` with the smoke initramfs in a VMM child process (`exe __vmm`), files in
/// `workdir`, and wait up to `timeout` for [`MARKER`]. Every way the VM can fail (it cannot
/// start, it ends, it says nothing in time) is a failed outcome; only kiln's own files
/// are errors.
pub fn run(
    exe: &Path,
    kernel: &Path,
    workdir: &Path,
    timeout: Duration,
) -> Result<SmokeOutcome, SmokeError> {
    let initrd = workdir.join("smoke-initramfs.cpio");
    let console = workdir.join("console.log");
    let write = |path: &Path, data: &[u8]| {
        std::fs::File::create(path)
            .and_then(|mut f| f.write_all(data))
            .map_err(|source| SmokeError::Initramfs {
                path: path.display().to_string(),
                source,
            })
    };
    write(&initrd, &initramfs())?;
    write(&console, b"")?;
    let spec = VmSpec {
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd),
        cmdline: Some(CMDLINE.into()),
        mem_size: 256 << 20,
        vcpus: 1,
        console_log: Some(console.clone()),
        ..VmSpec::default()
    };
    let start = Instant::now();
    let failed = |reason: String| SmokeOutcome {
        passed: false,
        reason,
        seconds: start.elapsed().as_secs_f64(),
        console_tail: tail(&console),
    };
    let p = match VmProcess::spawn(exe, &spec, &workdir.join("vmm.sock")) {
        Ok(p) => p,
        Err(e) => return Ok(failed(format!("the VMM process could not start: {e}"))),
    };
    let killer = match Killer::for_pid(p.pid()) {
        Ok(k) => k,
        Err(e) => return Ok(failed(format!("cannot watch the VMM process: {e}"))),
    };
    // Start and wait off this thread: a VMM wedged even before it answers `start` is
    // still caught by the deadline below.
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut p = p;
        let r = match p.start() {
            Ok(()) => p
                .wait()
                .map(|r| r.to_string())
                .map_err(|e| format!("lost the VMM process: {e}")),
            Err(e) => Err(format!("the VMM could not boot the kernel: {e}")),
        };
        let _ = tx.send(r);
    });
    let deadline = start + timeout;
    let outcome = loop {
        if console_has_marker(&console) {
            break SmokeOutcome {
                passed: true,
                reason: format!(
                    "userspace reached in {:.2} s",
                    start.elapsed().as_secs_f64()
                ),
                seconds: start.elapsed().as_secs_f64(),
                console_tail: tail(&console),
            };
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ended) => {
                // The marker may have been written just before the VM ended.
                if console_has_marker(&console) {
                    continue;
                }
                break failed(match ended {
                    Ok(exit) => format!("the VM ended before userspace: {exit}"),
                    Err(e) => e,
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break failed("the VMM watcher ended without a result".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                break failed(format!(
                    "no sign of userspace within {} s (the kernel runs too slowly on this \
                     host's KVM, or stopped)",
                    timeout.as_secs()
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    // Passed or failed, the VM is not needed any more; the waiter then returns.
    killer.kill();
    let _ = waiter.join();
    Ok(outcome)
}

fn console_has_marker(console: &Path) -> bool {
    std::fs::read(console)
        .map(|b| String::from_utf8_lossy(&b).contains(MARKER))
        .unwrap_or(false)
}

/// The last [`TAIL_LINES`] non-empty console lines.
pub fn tail(console: &Path) -> String {
    let text = std::fs::read(console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Kills the VMM child through a pidfd taken while it is surely alive and unreaped, so a
/// kill after the waiter reaped it cannot hit a recycled pid.
struct Killer(std::os::fd::OwnedFd);

impl Killer {
    fn for_pid(pid: u32) -> std::io::Result<Killer> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        Ok(Killer(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }

    fn kill(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal reads only its scalar arguments (no siginfo passed); an
        // already reaped process gives ESRCH, which is what we want ignored.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_program_runs_on_the_host_and_writes_its_text() {
        // The same program with exit(7) instead of reboot: runs safely on the host.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init");
        write_executable(&path, &init_program(b"hello from init\n", [60, 7, 0, 0]));
        let out = std::process::Command::new(&path).output().unwrap();
        assert_eq!(out.stdout, b"hello from init\n");
        assert_eq!(out.status.code(), Some(7));
    }

    #[test]
    fn init_program_is_what_an_assembler_makes_of_write_then_reboot() {
        use iced_x86::code_asm::*;
        let text = b"marker\n";
        let mut a = CodeAssembler::new(64).unwrap();
        let mut msg = a.create_label();
        let mut hang = a.create_label();
        a.mov(eax, 1).unwrap();
        a.mov(edi, 1).unwrap();
        a.lea(rsi, ptr(msg)).unwrap();
        a.mov(edx, text.len() as i32).unwrap();
        a.syscall().unwrap();
        a.mov(eax, 169).unwrap();
        a.mov(edi, 0xfee1_dead_u32 as i32).unwrap();
        a.mov(esi, 0x2812_1969).unwrap();
        a.mov(edx, 0x4321_fedc).unwrap();
        a.syscall().unwrap();
        a.set_label(&mut hang).unwrap();
        a.jmp(hang).unwrap();
        a.set_label(&mut msg).unwrap();
        a.db(text).unwrap();
        let code = a.assemble(BASE + (EHDR + PHDR) as u64).unwrap();
        let elf = init_program(text, POWER_OFF);
        assert_eq!(&elf[EHDR + PHDR..], &code[..]);
    }

    #[test]
    fn initramfs_is_newc_with_console_and_init() {
        let img = initramfs();
        assert_eq!(img.len() % 512, 0);
        assert!(img.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&img);
        for name in ["dev\0", "dev/console\0", "init\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name}");
        }
        assert!(text.contains(MARKER));
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let body: String = (0..20).map(|i| format!("line {i}\r\n\n")).collect();
        std::fs::write(&p, body).unwrap();
        let t = tail(&p);
        assert_eq!(t.lines().count(), TAIL_LINES);
        assert!(t.ends_with("line 19") && t.starts_with("line 8"), "{t}");
        assert_eq!(tail(&dir.path().join("absent")), "");
    }

    /// Runs the smoke test with `exe` as the VMM and checks it fails saying `says`; how
    /// long it took.
    fn fails_with(exe: &Path, timeout: Duration, says: &str) -> Duration {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let o = run(exe, &dir.path().join("vmlinuz"), dir.path(), timeout).unwrap();
        assert!(!o.passed && o.reason.contains(says), "{}", o.reason);
        started.elapsed()
    }

    #[test]
    fn a_vmm_that_cannot_start_is_a_failed_outcome() {
        let missing = Path::new("/nonexistent/kiln");
        fails_with(
            missing,
            Duration::from_secs(5),
            "the VMM process could not start",
        );
    }

    /// A VMM that takes the control connection and then never answers (wedged) is killed at
    /// the deadline: the smoke test never hangs.
    #[test]
    fn a_wedged_vmm_fails_at_the_deadline() {
        let Some(python) = ["/usr/bin/python3", "/bin/python3"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
        else {
            return kiln_e2e::skip(
                "a_wedged_vmm_fails_at_the_deadline: no python3 for the fake VMM",
            );
        };
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-vmm");
        // Called as `fake-vmm __vmm --socket S --spec JSON`: listen on S, accept, sleep.
        let script = format!(
            "#!{python}\nimport socket, sys, time\n\
             s = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[3])\ns.listen(1)\n\
             c, _ = s.accept()\ntime.sleep(600)\n"
        );
        write_executable(&fake, script.as_bytes());
        let took = fails_with(
            &fake,
            Duration::from_secs(2),
            "no sign of userspace within 2 s",
        );
        assert!(took < Duration::from_secs(12), "{took:?}");
    }

    fn write_executable(path: &Path, data: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, data).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The initramfs brings a real kernel to userspace under QEMU (TCG), so a smoke failure
    /// under kiln's VMM is the VMM's or the host's, never the initramfs's.
    #[test]
    fn initramfs_reaches_userspace_under_qemu() {
        use kiln_e2e::qemu::{qemu_available, Qemu, QemuConfig};
        if !qemu_available() {
            return kiln_e2e::skip("initramfs_reaches_userspace_under_qemu: no qemu-system-x86_64");
        }
        let kernel = match kiln_e2e::kernel::guest_kernel() {
            Ok(k) => k,
            Err(e) => {
                return kiln_e2e::skip(format!(
                    "initramfs_reaches_userspace_under_qemu: no test kernel: {e}"
                ))
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initramfs");
        std::fs::write(&initrd, initramfs()).unwrap();
        let log = dir.path().join("console.log");
        let mut cfg = QemuConfig::new(&kernel.vmlinuz, &initrd, &log);
        cfg.append = "panic=-1 no_timer_check rdinit=/init".into();
        cfg.shared_memory = false;
        cfg.memory_mib = 256;
        let mut q = Qemu::spawn(&cfg).unwrap();
        q.wait_for(MARKER, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        // And it powers the VM off by itself.
        assert!(q.wait_exit(Duration::from_secs(30)), "{}", q.output());
    }
}
