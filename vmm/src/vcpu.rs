//! A vCPU thread: run KVM_RUN, dispatch PIO/MMIO exits to the buses, and turn the exits
//! that end a VM into an [`ExitReason`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Instant;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, warn};

use crate::arch::x86_64::regs::{self, BootMode};
use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal, RegsDump};

/// Shared run control for all vCPUs of a VM: stop and pause.
#[derive(Default)]
pub struct RunState {
    stop: AtomicBool,
    paused: Mutex<bool>,
    cv: Condvar,
    /// Exits handled by all vCPUs (for statistics and the benchmark).
    pub exits: AtomicU64,
    /// When the first exit was seen (the guest's first instruction ran before it).
    pub first_exit: Mutex<Option<Instant>>,
    /// When a vCPU thread first called KVM_RUN (for the start-up breakdown).
    pub first_run: Mutex<Option<Instant>>,
}

impl RunState {
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    pub fn set_paused(&self, p: bool) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.cv.notify_all();
    }
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait_while_paused(&self) {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *p && !self.stopping() {
            p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN (the handler does nothing: the
/// interrupted ioctl returns EINTR and the loop looks at the run state).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick handler once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            warn!("installing the vCPU kick handler: {e}");
        }
    });
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    state: Arc<RunState>,
}

impl Vcpu {
    pub(crate) fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        state: Arc<RunState>,
    ) -> Vcpu {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            state,
        }
    }

    /// Load the boot register state for `mode` (the boot structures must be in memory).
    pub fn set_boot_state(&self, mode: BootMode) -> Result<(), kvm_ioctls::Error> {
        let sregs = self.fd.get_sregs()?;
        self.fd.set_sregs(&regs::boot_sregs(&sregs, mode))?;
        self.fd.set_regs(&regs::boot_regs(mode))
    }

    fn dump_regs(&self) -> Option<RegsDump> {
        let r = self.fd.get_regs().ok()?;
        let s = self.fd.get_sregs().ok()?;
        Some(RegsDump {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_base: s.cs.base,
            cs_selector: s.cs.selector,
        })
    }

    fn internal(&self, detail: String) -> ExitReason {
        ExitReason::InternalError {
            vcpu: self.id,
            detail,
            regs: self.dump_regs(),
        }
    }

    /// End the VM with `reason` without running (a setup step failed).
    pub(crate) fn fail(self, reason: ExitReason) -> Option<ExitReason> {
        self.exit.request(reason.clone());
        Some(reason)
    }

    /// Run until the VM ends or is stopped. Returns the reason this vCPU ended the VM, if
    /// it was this vCPU that did.
    pub fn run(mut self) -> Option<ExitReason> {
        self.state
            .first_run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        loop {
            if self.state.stopping() || self.exit.get().is_some() {
                return None;
            }
            if self.state.is_paused() {
                self.state.wait_while_paused();
                continue;
            }
            let mut unexpected = None;
            let reason = match self.fd.run() {
                Ok(exit) => {
                    if self.state.exits.fetch_add(1, Ordering::Relaxed) == 0 {
                        let mut f = self
                            .state
                            .first_exit
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert_with(Instant::now);
                    }
                    match exit {
                        VcpuExit::IoIn(port, data) => {
                            if !self.pio.read(u64::from(port), data) {
                                data.fill(0xff);
                            }
                            None
                        }
                        VcpuExit::IoOut(port, data) => {
                            if !self.pio.write(u64::from(port), data) {
                                debug!("unclaimed write to port {port:#x}");
                            }
                            None
                        }
                        VcpuExit::MmioRead(addr, data) => {
                            if !self.mmio.read(addr, data) {
                                data.fill(0xff);
                            }
                            None
                        }
                        VcpuExit::MmioWrite(addr, data) => {
                            if !self.mmio.write(addr, data) {
                                debug!("unclaimed MMIO write at {addr:#x}");
                            }
                            None
                        }
                        // With the in-kernel LAPIC a halted vCPU sleeps in the kernel; a
                        // userspace HLT exit only means "run again".
                        VcpuExit::Hlt => None,
                        VcpuExit::Shutdown => Some(ExitReason::TripleFault { vcpu: self.id }),
                        VcpuExit::SystemEvent(kind, _) => Some(match kind {
                            KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
                            KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                            KVM_SYSTEM_EVENT_CRASH => self.internal("guest crash event".into()),
                            k => self.internal(format!("system event {k}")),
                        }),
                        VcpuExit::InternalError => {
                            let i = self.fd.get_kvm_run();
                            // SAFETY: KVM filled the `internal` member for this exit reason.
                            let (sub, n) = unsafe {
                                let i = &i.__bindgen_anon_1.internal;
                                (i.suberror, i.ndata)
                            };
                            let what = match sub {
                                1 => "emulation failure",
                                2 => "simultaneous exceptions",
                                3 => "delivery event failure",
                                _ => "unknown",
                            };
                            Some(self.internal(format!(
                                "KVM internal error, suberror {sub} ({what}), {n} data words"
                            )))
                        }
                        VcpuExit::FailEntry(reason, cpu) => Some(self.internal(format!(
                            "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                        ))),
                        VcpuExit::Intr => None,
                        other => {
                            unexpected = Some(format!("unexpected exit {other:?}"));
                            None
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(ExitReason::VmmError {
                    detail: format!("KVM_RUN on vCPU {}: {e}", self.id),
                }),
            };
            let reason = reason.or_else(|| unexpected.map(|d| self.internal(d)));
            if let Some(r) = reason {
                self.exit.request(r.clone());
                return Some(r);
            }
        }
    }
}

/// The thread that creates the PIT and then runs the boot vCPU (see
/// [`crate::vm::Vm::new_overlapped`], which starts it): it waits for the vCPU on `tx`;
/// dropping `tx` ends it. It lives here, with the other vCPU threads, so that the VM
/// depends on the vCPU and not the other way round.
pub struct BootThread {
    pub(crate) tx: std::sync::mpsc::Sender<Vcpu>,
    pub(crate) handle: std::thread::JoinHandle<Option<ExitReason>>,
}

/// The running vCPU threads of a VM.
pub struct VcpuThreads {
    threads: Vec<std::thread::JoinHandle<Option<ExitReason>>>,
    state: Arc<RunState>,
}

impl VcpuThreads {
    /// Start each vCPU on its own thread.
    pub fn spawn(vcpus: Vec<Vcpu>, state: Arc<RunState>) -> std::io::Result<VcpuThreads> {
        Self::spawn_with_boot(None, vcpus, state)
    }

    /// Like [`VcpuThreads::spawn`], but the first vCPU goes to `boot`, a thread that is
    /// already running and waiting for it (see [`crate::vm::Vm::new_overlapped`]).
    pub fn spawn_with_boot(
        boot: Option<BootThread>,
        vcpus: Vec<Vcpu>,
        state: Arc<RunState>,
    ) -> std::io::Result<VcpuThreads> {
        install_kick_handler();
        let mut threads = Vec::with_capacity(vcpus.len());
        let mut vcpus = vcpus.into_iter();
        if let Some(b) = boot {
            if let Some(v) = vcpus.next() {
                // The thread only goes away without taking the vCPU if it panicked; the
                // join in `stop` reports that.
                let _ = b.tx.send(v);
            }
            threads.push(b.handle);
        }
        for v in vcpus {
            let name = format!("kiln-vcpu{}", v.id);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || v.run())
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let me = VcpuThreads { threads, state };
                    me.stop();
                    return Err(e);
                }
            }
        }
        Ok(VcpuThreads { threads, state })
    }

    /// Interrupt every vCPU still in KVM_RUN (for pause or stop).
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        for t in &self.threads {
            if !t.is_finished() {
                // SAFETY: the pthread is alive (not finished and not joined, as we own
                // its JoinHandle), and the kick signal has a handler installed.
                unsafe {
                    libc::pthread_kill(t.as_pthread_t(), kick_signal());
                }
            }
        }
    }

    /// Stop every vCPU and join its thread. A signal can arrive just before a thread
    /// enters KVM_RUN, so kick until every thread has left.
    pub fn stop(mut self) {
        self.state.request_stop();
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.kick();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a vCPU thread panicked");
            }
        }
    }
}
