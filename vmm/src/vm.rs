//! A KVM VM: guest memory registered with KVM, the in-kernel IRQ chip and PIT, KVM's TSS
//! and identity-map pages, the PIO and MMIO buses, and vCPUs set up with kiln's CPUID,
//! MSRs, FPU and LAPIC state.

use std::sync::{mpsc, Arc};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::{cpuid, layout, msrs, regs};
use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::phases::Phases;
use crate::vcpu::{BootThread, RunState, Vcpu};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0}, kiln needs 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability kiln needs: {0}")]
    MissingCap(&'static str),
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("building the vCPU's MSR list: {0:?}")]
    Msrs(vmm_sys_util::fam::Error),
    #[error("KVM set only {set} of {want} boot MSRs")]
    MsrsPartial { set: usize, want: usize },
    #[error("{0} vCPUs requested; kiln supports 1..={1}")]
    VcpuCount(u8, u8),
    #[error("starting the boot vCPU's thread: {0}")]
    SetupThread(#[source] std::io::Error),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Most vCPUs per VM (APIC IDs fit one byte in the MADT; KVM may allow fewer).
pub const MAX_VCPUS: u8 = 254;

/// One KVM VM with its memory and buses.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub run_state: Arc<RunState>,
    supported_cpuid: CpuId,
    msr_index_list: Vec<u32>,
    boot_thread: Option<BootThread>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A boot thread that never got its vCPU: let it finish before the VM goes away.
        if let Some(b) = self.boot_thread.take() {
            drop(b.tx);
            let _ = b.handle.join();
        }
    }
}

/// One KVM memory slot per region of `memory`.
fn memory_regions(memory: &GuestMemoryMmap) -> Result<Vec<kvm_userspace_memory_region>, VmError> {
    let mut v = Vec::new();
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::MissingCap("host mapping of guest memory"))?;
        v.push(kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        });
    }
    Ok(v)
}

impl Vm {
    /// Create a VM over `memory`: memory slots, TSS, identity map, IRQ chip, PIT.
    pub fn new(memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        Vm::create(memory, &Phases::new(), false)
    }

    /// Like [`Vm::new`], but the PIT (KVM starts a kernel thread for it and registers two
    /// I/O devices, each waiting for a grace period: on a loaded host that is whole
    /// scheduler ticks) is created on a thread of its own while the caller goes on
    /// (loading the payload, building tables, creating vCPUs), and that same thread then
    /// runs the boot vCPU once it is handed over ([`Vm::take_boot_thread`]), so the
    /// first instruction does not wait for a fresh thread to be scheduled. If the PIT
    /// cannot be created the VM ends at once with that error. Marks each step in `phases`.
    pub fn new_overlapped(memory: GuestMemoryMmap, phases: &Phases) -> Result<Vm, VmError> {
        Vm::create(memory, phases, true)
    }

    /// The boot-vCPU thread [`Vm::new_overlapped`] started, if it is still unclaimed.
    pub fn take_boot_thread(&mut self) -> Option<BootThread> {
        self.boot_thread.take()
    }

    fn create(memory: GuestMemoryMmap, phases: &Phases, overlap: bool) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        use kvm_ioctls::Cap;
        for (name, cap) in [
            ("irqchip", Cap::Irqchip),
            ("ioeventfd", Cap::Ioeventfd),
            ("irqfd", Cap::Irqfd),
            ("user_memory", Cap::UserMemory),
            ("set_tss_addr", Cap::SetTssAddr),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        phases.mark("KVM_CREATE_VM");

        // Guest memory first. Measured on PVM (vmm/README.md): the first slot of a fresh VM
        // registers in about 0.2 ms, but a slot registered after KVM_CREATE_IRQCHIP waits
        // 4-12 ms (whole 4 ms scheduler ticks, whatever its size) for the SRCU grace periods
        // the IRQ chip's device registrations left behind.
        for r in memory_regions(&memory)? {
            // SAFETY: the region is a live mapping owned by `memory`, which the Vm keeps for
            // as long as the VM fd (and so the memory slot) exists.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        phases.mark("KVM_SET_USER_MEMORY_REGION");
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        // Must come before any vCPU exists and before the PIT (which needs the PIC).
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        phases.mark("KVM_CREATE_IRQCHIP");
        let pit = kvm_pit_config {
            // Speaker port 0x61 is emulated in the kernel, so its reads never exit.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        let boot_thread = if overlap {
            let fd = fd.clone();
            let phases = phases.clone();
            let (tx, rx) = mpsc::channel::<Vcpu>();
            let handle = std::thread::Builder::new()
                .name("kiln-vcpu0".into())
                .spawn(move || {
                    let created = fd.create_pit2(pit);
                    phases.mark("KVM_CREATE_PIT2 (vCPU 0 thread)");
                    let vcpu = rx.recv().ok()?;
                    match created {
                        Ok(()) => vcpu.run(),
                        Err(e) => vcpu.fail(ExitReason::VmmError {
                            detail: format!("KVM_CREATE_PIT2: {e}"),
                        }),
                    }
                })
                .map_err(VmError::SetupThread)?;
            Some(BootThread { tx, handle })
        } else {
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
            phases.mark("KVM_CREATE_PIT2");
            None
        };
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        phases.mark("supported CPUID and MSR list");
        Ok(Vm {
            kvm,
            fd,
            memory,
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            exit: Arc::new(ExitSignal::new()),
            run_state: Arc::new(RunState::default()),
            supported_cpuid,
            msr_index_list,
            boot_thread,
        })
    }

    /// Create vCPU `id` of `count`, with CPUID, MSRs, FPU and LAPIC set; its registers are
    /// set separately (only the boot vCPU gets a boot state; the others wait for SIPI).
    pub fn create_vcpu(&self, id: u8, count: u8) -> Result<Vcpu, VmError> {
        if count == 0 || count > MAX_VCPUS || id >= count {
            return Err(VmError::VcpuCount(count, MAX_VCPUS));
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.supported_cpuid.clone();
        cpuid::adjust(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let m = msrs::boot_msrs(&self.msr_index_list).map_err(VmError::Msrs)?;
        let want = m.as_slice().len();
        let set = fd.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != want {
            return Err(VmError::MsrsPartial { set, want });
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        Ok(Vcpu::new(
            id,
            fd,
            self.pio.clone(),
            self.mmio.clone(),
            self.exit.clone(),
            self.run_state.clone(),
        ))
    }
}
