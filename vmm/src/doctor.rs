//! Host probe: can kiln's own VMM run a stock Linux kernel here, and which engine should a
//! build use?
//!
//! The probe opens `/dev/kvm`, asks for the capabilities kiln's VMM needs, and works out the
//! virtualization vendor. PVM (pagetable-based virtualization, the out-of-tree `kvm_pvm`
//! module) exposes a working `/dev/kvm` on CPUs without `vmx`/`svm`, but it runs only
//! PVM-built guest kernels at native speed: an unmodified kernel is emulated instruction by
//! instruction and stops on the first instruction the emulator lacks. So on PVM the probe
//! recommends the QEMU (TCG) engine even though `/dev/kvm` works.

use std::fs;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// What the host offers for hardware virtualization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Intel VT-x (`vmx` in the CPU flags).
    Vtx,
    /// AMD-V (`svm` in the CPU flags).
    Svm,
    /// PVM: KVM without hardware virtualization (`kvm_pvm` loaded, no `vmx`/`svm`).
    Pvm,
    /// No KVM vendor could be identified.
    None,
}

impl Vendor {
    pub fn describe(self) -> &'static str {
        match self {
            Vendor::Vtx => "Intel VT-x",
            Vendor::Svm => "AMD-V",
            Vendor::Pvm => "PVM (pagetable-based virtualization, no VT-x/AMD-V)",
            Vendor::None => "none",
        }
    }
}

/// The engine a build should use on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// kiln's own VMM on /dev/kvm.
    Kvm,
    /// QEMU with TCG for the CPU, kiln's device backends over vhost-user.
    Qemu,
}

/// State of `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KvmState {
    /// Opened, API version 12.
    Usable { api_version: i32 },
    /// The device node does not exist.
    Absent,
    /// It exists but could not be opened (permissions, or the module refused).
    Inaccessible { error: String },
}

/// One KVM capability kiln's VMM relies on, and whether the host has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: &'static str,
    pub present: bool,
}

/// The result of [`probe`].
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub kvm: KvmState,
    pub vendor: Vendor,
    /// Capabilities kiln's VMM needs; empty when /dev/kvm could not be opened.
    pub capabilities: Vec<Capability>,
    /// Maximum vCPUs KVM recommends per VM (0 when unknown).
    pub max_vcpus: usize,
    /// Whether an unmodified distro kernel can run on kiln's VMM here.
    pub stock_kernel_ok: bool,
    pub recommended_engine: Engine,
    /// One line saying why `recommended_engine` was picked.
    pub reason: String,
}

/// The capabilities the VMM uses, by the name `kiln doctor` shows.
const NEEDED: &[(&str, Cap)] = &[
    ("user_memory", Cap::UserMemory),
    ("irqchip", Cap::Irqchip),
    ("pit2", Cap::Pit2),
    ("ioeventfd", Cap::Ioeventfd),
    ("irqfd", Cap::Irqfd),
    ("ext_cpuid", Cap::ExtCpuid),
    ("set_tss_addr", Cap::SetTssAddr),
    ("set_identity_map_addr", Cap::SetIdentityMapAddr),
    ("immediate_exit", Cap::ImmediateExit),
];

/// Inputs of the probe read from the host, kept apart so the decision is unit-testable.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// The `flags` line of the first CPU in /proc/cpuinfo.
    pub cpu_flags: Vec<String>,
    /// Loaded kernel modules (from /proc/modules or /sys/module).
    pub modules: Vec<String>,
}

impl HostFacts {
    /// Read the CPU flags and module list of this host.
    pub fn read() -> HostFacts {
        let cpu_flags = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("flags"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect())
            })
            .unwrap_or_default();
        let mut modules: Vec<String> = fs::read_to_string("/proc/modules")
            .map(|s| {
                s.lines()
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // /proc/modules is absent in some containers; /sys/module lists built-in and loaded
        // modules alike, which is what matters for the kvm vendor modules.
        for m in ["kvm_pvm", "kvm_intel", "kvm_amd"] {
            if Path::new("/sys/module").join(m).exists() && !modules.iter().any(|x| x == m) {
                modules.push(m.to_owned());
            }
        }
        HostFacts { cpu_flags, modules }
    }

    fn has_flag(&self, f: &str) -> bool {
        self.cpu_flags.iter().any(|x| x == f)
    }

    fn has_module(&self, m: &str) -> bool {
        self.modules.iter().any(|x| x == m)
    }

    /// The vendor these facts show.
    pub fn vendor(&self) -> Vendor {
        // PVM first: kvm_pvm can be loaded next to kvm_intel on a VT-x host, but then the
        // CPU flags show vmx and the hardware vendor module serves /dev/kvm.
        if self.has_flag("vmx") {
            Vendor::Vtx
        } else if self.has_flag("svm") {
            Vendor::Svm
        } else if self.has_module("kvm_pvm") {
            Vendor::Pvm
        } else {
            Vendor::None
        }
    }
}

/// Probe this host. Never fails: every problem is reported in the result.
pub fn probe() -> Probe {
    probe_with(&HostFacts::read(), Path::new("/dev/kvm"))
}

/// Probe with given host facts and KVM device path (for tests).
pub fn probe_with(facts: &HostFacts, kvm_path: &Path) -> Probe {
    let vendor = facts.vendor();
    let (kvm, capabilities, max_vcpus) = if !kvm_path.exists() {
        (KvmState::Absent, Vec::new(), 0)
    } else {
        let opened = std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes())
            .map_err(|e| e.to_string())
            .and_then(|p| Kvm::new_with_path(p).map_err(|e| e.to_string()));
        match opened {
            Ok(k) => {
                let caps = NEEDED
                    .iter()
                    .map(|(name, cap)| Capability {
                        name,
                        present: k.check_extension(*cap),
                    })
                    .collect();
                (
                    KvmState::Usable {
                        api_version: k.get_api_version(),
                    },
                    caps,
                    k.get_nr_vcpus(),
                )
            }
            Err(error) => (KvmState::Inaccessible { error }, Vec::new(), 0),
        }
    };
    let (stock_kernel_ok, recommended_engine, reason) = decide(&kvm, vendor, &capabilities);
    Probe {
        kvm,
        vendor,
        capabilities,
        max_vcpus,
        stock_kernel_ok,
        recommended_engine,
        reason,
    }
}

fn decide(kvm: &KvmState, vendor: Vendor, caps: &[Capability]) -> (bool, Engine, String) {
    match kvm {
        KvmState::Absent => {
            return (
                false,
                Engine::Qemu,
                "/dev/kvm is absent: QEMU with TCG supplies the CPU".into(),
            )
        }
        KvmState::Inaccessible { error } => {
            return (
                false,
                Engine::Qemu,
                format!("/dev/kvm cannot be opened ({error}): QEMU with TCG supplies the CPU"),
            )
        }
        KvmState::Usable { .. } => {}
    }
    let missing: Vec<&str> = caps.iter().filter(|c| !c.present).map(|c| c.name).collect();
    if !missing.is_empty() {
        return (
            false,
            Engine::Qemu,
            format!(
                "KVM lacks capabilities kiln needs ({}): QEMU with TCG supplies the CPU",
                missing.join(", ")
            ),
        );
    }
    match vendor {
        Vendor::Vtx | Vendor::Svm => (
            true,
            Engine::Kvm,
            format!(
                "/dev/kvm on {} with every capability kiln needs: kiln's own VMM",
                vendor.describe()
            ),
        ),
        Vendor::Pvm => (
            false,
            Engine::Qemu,
            "KVM is PVM here: tiny guests run, but an unmodified Linux kernel is emulated \
             instruction by instruction and fails, so QEMU with TCG supplies the CPU"
                .into(),
        ),
        Vendor::None => (
            false,
            Engine::Qemu,
            "/dev/kvm works but no vmx/svm CPU flag or known KVM vendor module was found: \
             QEMU with TCG supplies the CPU"
                .into(),
        ),
    }
}

impl Probe {
    /// The multi-line report `kiln doctor` prints: [`Probe::report_facts`] and the engine
    /// the probe recommends.
    pub fn report(&self) -> String {
        use std::fmt::Write;
        let mut s = self.report_facts();
        let engine = match self.recommended_engine {
            Engine::Kvm => "kvm",
            Engine::Qemu => "qemu",
        };
        let _ = writeln!(s, "engine (auto):     {engine}: {}", self.reason);
        s
    }

    /// What the probe found, one fact a line, without a recommendation.
    pub fn report_facts(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let kvm = match &self.kvm {
            KvmState::Usable { api_version } => format!("present and usable (API {api_version})"),
            KvmState::Absent => "absent".to_owned(),
            KvmState::Inaccessible { error } => format!("present but not usable: {error}"),
        };
        let _ = writeln!(s, "/dev/kvm:          {kvm}");
        let _ = writeln!(s, "vendor:            {}", self.vendor.describe());
        if !self.capabilities.is_empty() {
            let caps: Vec<String> = self
                .capabilities
                .iter()
                .map(|c| format!("{}{}", if c.present { "+" } else { "-" }, c.name))
                .collect();
            let _ = writeln!(s, "capabilities:      {}", caps.join(" "));
            let _ = writeln!(s, "max vcpus:         {}", self.max_vcpus);
        }
        let _ = writeln!(
            s,
            "stock kernel:      {}",
            if self.stock_kernel_ok {
                "runs on kiln's VMM"
            } else {
                "cannot run on kiln's VMM here"
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flags: &[&str], modules: &[&str]) -> HostFacts {
        HostFacts {
            cpu_flags: flags.iter().map(|s| s.to_string()).collect(),
            modules: modules.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn all_caps() -> Vec<Capability> {
        NEEDED
            .iter()
            .map(|(name, _)| Capability {
                name,
                present: true,
            })
            .collect()
    }

    #[test]
    fn vendor_from_flags_and_modules() {
        assert_eq!(facts(&["fpu", "vmx"], &["kvm_intel"]).vendor(), Vendor::Vtx);
        assert_eq!(facts(&["svm"], &["kvm_amd"]).vendor(), Vendor::Svm);
        assert_eq!(
            facts(&["fpu", "lm"], &["kvm", "kvm_pvm"]).vendor(),
            Vendor::Pvm
        );
        assert_eq!(facts(&["fpu"], &["kvm"]).vendor(), Vendor::None);
        // vmx wins over a loaded kvm_pvm: the hardware module serves /dev/kvm then.
        assert_eq!(facts(&["vmx"], &["kvm_pvm"]).vendor(), Vendor::Vtx);
    }

    #[test]
    fn decision_table() {
        let usable = KvmState::Usable { api_version: 12 };
        let (ok, e, _) = decide(&usable, Vendor::Vtx, &all_caps());
        assert!(ok);
        assert_eq!(e, Engine::Kvm);
        let (ok, e, why) = decide(&usable, Vendor::Pvm, &all_caps());
        assert!(!ok);
        assert_eq!(e, Engine::Qemu);
        assert!(why.contains("PVM"), "{why}");
        let (ok, e, _) = decide(&KvmState::Absent, Vendor::Vtx, &[]);
        assert!(!ok && e == Engine::Qemu);
        let mut caps = all_caps();
        caps[3].present = false;
        let (ok, e, why) = decide(&usable, Vendor::Svm, &caps);
        assert!(!ok && e == Engine::Qemu);
        assert!(why.contains("ioeventfd"), "{why}");
    }

    #[test]
    fn absent_device_path() {
        let p = probe_with(&facts(&["vmx"], &[]), Path::new("/nonexistent/kvm"));
        assert_eq!(p.kvm, KvmState::Absent);
        assert_eq!(p.recommended_engine, Engine::Qemu);
        assert!(p.report().contains("absent"));
    }

    #[test]
    fn this_host_probe_is_consistent() {
        let p = probe();
        let json = serde_json::to_string(&p).expect("probe serializes");
        assert!(json.contains("recommended_engine"));
        if p.stock_kernel_ok {
            assert_eq!(p.recommended_engine, Engine::Kvm);
        } else {
            assert_eq!(p.recommended_engine, Engine::Qemu);
        }
        eprintln!("{}", p.report());
    }
}
