//! The embeddable API: describe a VM with [`VmConfig`], start it with [`Machine::start`],
//! then [`Machine::wait`] for it to end or [`Machine::stop`] it.
//!
//! ```no_run
//! use kiln_vmm::machine::{Machine, VmConfig};
//! let config = VmConfig::builder()
//!     .memory(256 << 20)
//!     .vcpus(1)
//!     .kernel("/boot/vmlinuz")
//!     .cmdline("console=ttyS0 panic=-1")
//!     .build()?;
//! let mut vm = Machine::start(config)?;
//! let reason = vm.wait();
//! println!("the VM ended: {reason}");
//! # Ok::<(), kiln_vmm::machine::MachineError>(())
//! ```

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, MmioDevice};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::BootMode;
use crate::boot::linux::{self, KernelSpec};
use crate::boot::{self, BootError};
use crate::exit::ExitReason;
use crate::memory::{self, MemoryError};
use crate::phases::Phases;
use crate::power::{AcpiPower, I8042};
use crate::serial::{ConsoleOutput, SerialDevice};
use crate::transport::mmio::TransportError;
use crate::transport::{MmioTransport, VirtioDevice};
use crate::vcpu::VcpuThreads;
use crate::vm::{Vm, VmError};

/// Raw code or data and the guest-physical address each goes to.
pub type Segments = Vec<(u64, Vec<u8>)>;

/// What the boot vCPU runs.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Direct Linux boot.
    Kernel(KernelSpec),
    /// Raw code (tests, benchmarks): `segments` written at their addresses, then the boot
    /// vCPU starts in `mode` with kiln's GDT and page tables in place.
    Program {
        segments: Vec<(u64, Vec<u8>)>,
        mode: BootMode,
    },
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// Append console output to this file.
    pub log: Option<PathBuf>,
    /// Copy console output to stdout and feed stdin to the guest.
    pub terminal: bool,
    /// Keep console output in memory ([`Machine::console_output`]).
    pub capture: bool,
}

/// A VM's description.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub payload: Payload,
    pub console: ConsoleConfig,
    /// virtio devices, placed in order at 0xd000_0000 + i * 0x1000 with GSI 5 + i.
    pub devices: Vec<Box<dyn VirtioDevice>>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_size", &self.mem_size)
            .field("vcpus", &self.vcpus)
            .field("payload", &self.payload)
            .field("console", &self.console)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// Most virtio devices a VM can have (one GSI each, 5..=23).
pub const MAX_DEVICES: usize = (layout::IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1) as usize;

impl VmConfig {
    pub fn builder() -> VmConfigBuilder {
        VmConfigBuilder::default()
    }
}

/// Builds a [`VmConfig`]; defaults: 512 MiB, 1 vCPU, command line `console=ttyS0`.
#[derive(Default)]
pub struct VmConfigBuilder {
    mem_size: Option<u64>,
    vcpus: Option<u8>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    program: Option<(Segments, BootMode)>,
    console: ConsoleConfig,
    devices: Vec<Box<dyn VirtioDevice>>,
}

impl VmConfigBuilder {
    pub fn memory(mut self, bytes: u64) -> Self {
        self.mem_size = Some(bytes);
        self
    }
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = Some(n);
        self
    }
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }
    pub fn cmdline(mut self, s: impl Into<String>) -> Self {
        self.cmdline = Some(s.into());
        self
    }
    /// Run raw code instead of a kernel.
    pub fn program(mut self, segments: Vec<(u64, Vec<u8>)>, mode: BootMode) -> Self {
        self.program = Some((segments, mode));
        self
    }
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.console.log = Some(path.into());
        self
    }
    pub fn console_terminal(mut self, on: bool) -> Self {
        self.console.terminal = on;
        self
    }
    pub fn capture_console(mut self, on: bool) -> Self {
        self.console.capture = on;
        self
    }
    pub fn device(mut self, d: Box<dyn VirtioDevice>) -> Self {
        self.devices.push(d);
        self
    }

    pub fn build(self) -> Result<VmConfig, MachineError> {
        let payload = match (self.kernel, self.program) {
            (Some(_), Some(_)) => {
                return Err(MachineError::Config(
                    "give a kernel or a program, not both".into(),
                ))
            }
            (None, None) => return Err(MachineError::Config("no kernel given".into())),
            (Some(kernel), None) => Payload::Kernel(KernelSpec {
                kernel,
                initrd: self.initrd,
                cmdline: self.cmdline.unwrap_or_else(|| "console=ttyS0".into()),
            }),
            (None, Some((segments, mode))) => Payload::Program { segments, mode },
        };
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > crate::vm::MAX_VCPUS {
            return Err(MachineError::Config(format!(
                "{vcpus} vCPUs: kiln supports 1..={}",
                crate::vm::MAX_VCPUS
            )));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(MachineError::Config(format!(
                "{} virtio devices: at most {MAX_DEVICES}",
                self.devices.len()
            )));
        }
        Ok(VmConfig {
            mem_size: self.mem_size.unwrap_or(512 << 20),
            vcpus,
            payload,
            console: self.console,
            devices: self.devices,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("virtio device {index}: {source}")]
    Transport {
        index: usize,
        #[source]
        source: TransportError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the boot vCPU's registers: {0}")]
    BootRegs(#[source] kvm_ioctls::Error),
    #[error("the bus refused a device: {0}")]
    Bus(#[from] crate::bus::BusError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MachineError {
    let what = what.into();
    move |source| MachineError::Io { what, source }
}

/// A running VM.
pub struct Machine {
    vm: Vm,
    threads: Option<VcpuThreads>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// When `start` was called and when the vCPUs were started.
    pub started: Instant,
    pub vcpus_started: Instant,
    reason: Option<ExitReason>,
    phases: Phases,
}

/// A VM that is fully built (memory, KVM setup, devices, payload loaded, vCPUs created
/// with their boot registers) but whose vCPUs have not run yet. [`Prepared::start`] runs
/// them. Splitting the two lets a VMM process build its VM while it waits for the order to
/// start.
pub struct Prepared {
    vm: Vm,
    vcpus: Vec<crate::vcpu::Vcpu>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    terminal: bool,
    started: Instant,
    phases: Phases,
}

impl Prepared {
    /// The start-up marks so far.
    pub fn phases(&self) -> &Phases {
        &self.phases
    }

    /// Start the vCPUs (the boot vCPU on the thread that created the PIT).
    pub fn start(mut self) -> Result<Machine, MachineError> {
        let vcpus_started = Instant::now();
        let threads = VcpuThreads::spawn_with_boot(
            self.vm.take_boot_thread(),
            std::mem::take(&mut self.vcpus),
            self.vm.run_state.clone(),
        )
        .map_err(io_err("starting vCPU threads"))?;
        self.phases.mark("vCPUs handed to their threads");
        let machine = Machine {
            vm: self.vm,
            threads: Some(threads),
            capture: self.capture,
            serial: self.serial,
            transports: self.transports,
            started: self.started,
            vcpus_started,
            reason: None,
            phases: self.phases,
        };
        if self.terminal {
            machine.forward_stdin();
        }
        Ok(machine)
    }
}

impl Machine {
    /// Build the VM and start its vCPUs.
    pub fn start(config: VmConfig) -> Result<Machine, MachineError> {
        Machine::prepare(config, Phases::new())?.start()
    }

    /// Build the VM without running it; marks each step in `phases`. The PIT is created
    /// on the boot vCPU's thread while the payload is loaded and the tables built (see
    /// [`Vm::new_overlapped`]).
    pub fn prepare(config: VmConfig, phases: Phases) -> Result<Prepared, MachineError> {
        let started = Instant::now();
        let mem = memory::create_guest_memory(config.mem_size)?;
        phases.mark("guest memory mapped");
        let vm = Vm::new_overlapped(mem.clone(), &phases)?;

        // Console.
        let capture = config
            .console
            .capture
            .then(|| Arc::new(Mutex::new(Vec::new())));
        let log = match &config.console.log {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io_err(format!("opening the console log {}", p.display())))?,
            ),
            None => None,
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("an eventfd"))?;
        vm.fd
            .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|source| VmError::Kvm {
                op: "KVM_IRQFD (serial)",
                source,
            })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            ConsoleOutput {
                log,
                terminal: config.console.terminal,
                capture: capture.clone(),
            },
        )));
        vm.pio
            .insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
        vm.pio.insert(
            Arc::new(Mutex::new(I8042::new(vm.exit.clone()))),
            u64::from(layout::I8042_DATA_PORT),
            5,
        )?;
        vm.pio.insert(
            Arc::new(Mutex::new(AcpiPower {
                signal: vm.exit.clone(),
            })),
            u64::from(layout::ACPI_POWER_PORT),
            1,
        )?;
        phases.mark("serial and power devices");

        // virtio devices.
        let mut transports = Vec::new();
        let mut described = Vec::new();
        for (i, dev) in config.devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_STRIDE;
            let gsi = layout::VIRTIO_IRQ_BASE + i as u32;
            let t = MmioTransport::new(dev, mem.clone(), Some(&vm.fd), base, gsi)
                .map_err(|source| MachineError::Transport { index: i, source })?;
            let t = Arc::new(Mutex::new(t));
            vm.mmio.insert(t.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
            transports.push(t);
            described.push(MmioDevice {
                base,
                len: layout::VIRTIO_MMIO_SIZE,
                gsi,
            });
        }
        phases.mark("virtio transports");

        // ACPI tables and the payload.
        let tables = acpi::build(config.vcpus, &described).map_err(BootError::from)?;
        mem.write_slice(&tables.bytes, GuestAddress(layout::ACPI_ADDR))
            .map_err(|source| BootError::Memory {
                what: "the ACPI tables",
                source,
            })?;
        phases.mark("ACPI tables");
        let mode = match &config.payload {
            Payload::Kernel(spec) => {
                let loaded = linux::load(&mem, config.mem_size, spec, tables.rsdp_addr)?;
                tracing::info!(
                    "loaded {:?} kernel, entry {:?}, initrd {:?}",
                    loaded.kind,
                    loaded.mode,
                    loaded.initrd
                );
                loaded.mode
            }
            Payload::Program { segments, mode } => {
                for (addr, bytes) in segments {
                    mem.write_slice(bytes, GuestAddress(*addr))
                        .map_err(|source| BootError::Memory {
                            what: "the program",
                            source,
                        })?;
                }
                *mode
            }
        };
        boot::write_boot_structures(&mem, mode)?;
        phases.mark("payload, boot parameters, GDT and page tables");

        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            vcpus.push(vm.create_vcpu(id, config.vcpus)?);
        }
        vcpus[0]
            .set_boot_state(mode)
            .map_err(MachineError::BootRegs)?;
        phases.mark("vCPUs created (CPUID, MSRs, LAPIC, registers)");
        Ok(Prepared {
            vm,
            vcpus,
            capture,
            serial,
            transports,
            terminal: config.console.terminal,
            started,
            phases,
        })
    }

    /// The start-up marks (see [`Machine::prepare`]); the first vCPU exit is added when
    /// it happens.
    pub fn phases(&self) -> Vec<crate::phases::Phase> {
        let mut v = self.phases.snapshot();
        let first_run = *self
            .vm
            .run_state
            .first_run
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = first_run {
            v.push(crate::phases::Phase {
                name: "first KVM_RUN called (vCPU thread)".into(),
                at_ns: crate::phases::instant_to_ns(t),
            });
        }
        if let Some(t) = self.first_exit() {
            v.push(crate::phases::Phase {
                name: "first guest exit (vCPU thread)".into(),
                at_ns: crate::phases::instant_to_ns(t),
            });
        }
        v
    }

    fn forward_stdin(&self) {
        let serial = self.serial.clone();
        let exit = self.vm.exit.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-console-in".into())
            .spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while exit.get().is_none() {
                    match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut rest = &buf[..n];
                            while !rest.is_empty() && exit.get().is_none() {
                                let took = serial
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .enqueue_input(rest);
                                rest = &rest[took..];
                                if took == 0 {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("console input disabled: {e}");
        }
    }

    fn finish(&mut self, reason: ExitReason) -> ExitReason {
        if let Some(t) = self.threads.take() {
            t.stop();
        }
        let reason = self.vm.exit.get().unwrap_or(reason);
        self.reason = Some(reason.clone());
        reason
    }

    /// Block until the VM ends; its vCPUs are stopped when this returns.
    pub fn wait(&mut self) -> ExitReason {
        if let Some(r) = &self.reason {
            return r.clone();
        }
        let r = self.vm.exit.wait(None).unwrap_or(ExitReason::Stopped);
        self.finish(r)
    }

    /// Like [`Machine::wait`] but gives up after `timeout` (the VM keeps running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReason> {
        if let Some(r) = &self.reason {
            return Some(r.clone());
        }
        let r = self.vm.exit.wait(Some(timeout))?;
        Some(self.finish(r))
    }

    /// Stop the VM now (if it has not ended already) and return why it ended.
    pub fn stop(&mut self) -> ExitReason {
        self.vm.exit.request(ExitReason::Stopped);
        self.wait()
    }

    /// Pause every vCPU (they leave KVM_RUN and wait).
    pub fn pause(&self) {
        self.vm.run_state.set_paused(true);
        if let Some(t) = &self.threads {
            t.kick();
        }
    }

    pub fn resume(&self) {
        self.vm.run_state.set_paused(false);
    }

    pub fn is_paused(&self) -> bool {
        self.vm.run_state.is_paused()
    }

    /// The reason, if the VM has ended (without blocking).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.reason.clone().or_else(|| self.vm.exit.get())
    }

    /// Console output so far (empty unless capture was asked for).
    pub fn console_output(&self) -> Vec<u8> {
        self.capture
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Exits handled by the VMM so far.
    pub fn exit_count(&self) -> u64 {
        self.vm
            .run_state
            .exits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the first vCPU exit happened (the guest had run its first instruction).
    pub fn first_exit(&self) -> Option<Instant> {
        *self
            .vm
            .run_state
            .first_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The virtio transports, in device order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.threads.is_some() {
            self.vm.exit.request(ExitReason::Stopped);
            self.finish(ExitReason::Stopped);
        }
    }
}
