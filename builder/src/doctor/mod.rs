//! `kiln doctor`'s answer to "can I build here?": one finding per thing a build needs (the
//! engine and QEMU, the guest agent, the tools each source kind runs, root, the cache and
//! runtime folders, firmware), each with what was found and, when it is not fine, the fix.
//! KVM itself is kiln-vmm's probe ([`kiln_vmm::doctor`]); this module adds the rest.

mod qemu;
mod storage;
mod tools;

use serde::Serialize;

pub use qemu::{QemuFacts, REQUIRED_DEVICES};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Something some builds need is missing (a source kind, firmware boots); others run.
    Warn,
    /// No build can run here until it is fixed.
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Short and stable: `engine`, `qemu`, `agent`, `cache`, ...
    pub check: &'static str,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do about it; None when it is fine.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, found: impl Into<String>) -> Self {
        Finding {
            check,
            status: Status::Ok,
            found: found.into(),
            fix: None,
        }
    }

    fn bad(
        check: &'static str,
        status: Status,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            check,
            status,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What the checks need from the rest of `kiln doctor`.
pub struct HostInputs<'a> {
    /// `--engine auto` picks kiln's VMM here (else QEMU).
    pub auto_is_kvm: bool,
    pub firmware: &'a crate::engine::firmware::FirmwareReport,
    pub probe: &'a kiln_vmm::doctor::Probe,
}

/// Every finding, in the order the report shows them.
pub fn check_host(input: &HostInputs) -> Vec<Finding> {
    let qemu = QemuFacts::probe();
    let mut f = vec![kvm_access(input.probe)];
    f.push(qemu::finding(qemu.as_ref(), input.auto_is_kvm));
    f.push(agent());
    f.extend(tools::findings());
    f.push(firmware(input.firmware));
    f.push(storage::cache());
    f.push(storage::runtime());
    f
}

/// No finding stops every build.
pub fn can_build(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.status != Status::Fail)
}

/// `/dev/kvm` for kiln's own VMM: missing, closed or unable to run a stock kernel is not
/// fatal (QEMU's TCG builds), but every build is then emulated.
fn kvm_access(probe: &kiln_vmm::doctor::Probe) -> Finding {
    use kiln_vmm::doctor::KvmState;
    const TCG: &str = "builds run under QEMU's TCG (emulated, several times slower)";
    match &probe.kvm {
        KvmState::Usable { .. } if probe.stock_kernel_ok => {
            Finding::ok("kvm", format!("usable: {}", probe.vendor.describe()))
        }
        KvmState::Usable { .. } => Finding::bad(
            "kvm",
            Status::Warn,
            format!("usable but cannot run a stock kernel: {}", probe.reason),
            format!("{TCG}; a host with VT-x or AMD-V runs them on kiln's own VMM"),
        ),
        KvmState::Absent => Finding::bad(
            "kvm",
            Status::Warn,
            "/dev/kvm is absent",
            format!(
                "{TCG}; on a host with VT-x/AMD-V, load kvm_intel or kvm_amd (on a cloud VM, \
                 turn on nested virtualization)"
            ),
        ),
        KvmState::Inaccessible { error } => Finding::bad(
            "kvm",
            Status::Warn,
            format!("/dev/kvm cannot be opened: {error}"),
            "add yourself to the `kvm` group (`sudo usermod -aG kvm $USER`, then log in \
             again), or a udev rule: KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"",
        ),
    }
}

/// The guest agent every agent-driven build puts into its guests: the same file and digest
/// a build would use (KILN_AGENT_BIN, else the one embedded in kiln, written to the cache).
fn agent() -> Finding {
    use crate::agent_binary::{locate, Origin};
    match locate() {
        Ok(a) => {
            let from = match a.origin {
                Origin::Env => "KILN_AGENT_BIN",
                Origin::Embedded => "embedded in kiln",
                Origin::BesideKiln => "beside kiln",
            };
            Finding::ok(
                "agent",
                format!(
                    "{} ({from}, sha256 {})",
                    a.path.display(),
                    &a.sha256[..a.sha256.len().min(12)]
                ),
            )
        }
        Err(e) => Finding::bad(
            "agent",
            Status::Fail,
            e.to_string(),
            "build kiln from its repository (its build embeds the agent), or set KILN_AGENT_BIN \
             to a static kiln-agent",
        ),
    }
}

fn firmware(r: &crate::engine::firmware::FirmwareReport) -> Finding {
    match (r.bios, r.uefi) {
        (true, true) => Finding::ok(
            "firmware",
            format!(
                "SeaBIOS and OVMF{}",
                if r.secure_boot {
                    " (with secure boot)"
                } else {
                    ""
                }
            ),
        ),
        (bios, uefi) => {
            let mut missing = vec![];
            if !bios {
                missing.push((
                    "SeaBIOS",
                    "seabios",
                    "`boot: firmware` on BIOS and ISO installs",
                ));
            }
            if !uefi {
                missing.push(("OVMF", "ovmf", "`efiFirmware` (UEFI) boots"));
            }
            Finding::bad(
                "firmware",
                Status::Warn,
                format!(
                    "{} missing: {} cannot run",
                    missing
                        .iter()
                        .map(|m| m.0)
                        .collect::<Vec<_>>()
                        .join(" and "),
                    missing.iter().map(|m| m.2).collect::<Vec<_>>().join(", ")
                ),
                format!(
                    "install the Debian package{} {}",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.iter().map(|m| m.1).collect::<Vec<_>>().join(" ")
                ),
            )
        }
    }
}
