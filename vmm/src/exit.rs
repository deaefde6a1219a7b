//! Why a VM ended, and the one-shot signal devices and vCPUs use to end it.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Register state captured when a vCPU stopped on an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegsDump {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_base: u64,
    pub cs_selector: u16,
}

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off (ACPI S5, or KVM's system-event shutdown).
    Poweroff,
    /// The guest reset (keyboard controller 0xFE, ACPI reset register, system event).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM could not run a vCPU on: emulation failure, entry failure or an unexpected exit.
    InternalError {
        vcpu: u8,
        detail: String,
        regs: Option<RegsDump>,
    },
    /// The host asked the VM to stop.
    Stopped,
    /// The VMM itself failed (an ioctl, a thread).
    VmmError { detail: String },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Poweroff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            ExitReason::InternalError { vcpu, detail, regs } => {
                write!(f, "internal error on vCPU {vcpu}: {detail}")?;
                if let Some(r) = regs {
                    write!(
                        f,
                        " (rip={:#x} rsp={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x})",
                        r.rip, r.rsp, r.cs_selector, r.cr0, r.cr3, r.cr4, r.efer
                    )?;
                }
                Ok(())
            }
            ExitReason::Stopped => write!(f, "stopped by the host"),
            ExitReason::VmmError { detail } => write!(f, "VMM error: {detail}"),
        }
    }
}

/// Set once with the first reason; everything waiting on it wakes.
#[derive(Default)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl ExitSignal {
    pub fn new() -> ExitSignal {
        ExitSignal::default()
    }

    /// Record `reason` unless one is already recorded (the first cause wins).
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            self.cv.notify_all();
        }
    }

    pub fn get(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Block until a reason is recorded, or `timeout` passes (None).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while r.is_none() {
            match deadline {
                None => r = self.cv.wait(r).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    r = self
                        .cv
                        .wait_timeout(r, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_wakes_waiters() {
        let s = Arc::new(ExitSignal::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(None));
        s.request(ExitReason::Reset);
        s.request(ExitReason::Poweroff);
        assert_eq!(t.join().unwrap(), Some(ExitReason::Reset));
        assert_eq!(
            s.wait(Some(Duration::from_millis(1))),
            Some(ExitReason::Reset)
        );
        assert_eq!(ExitSignal::new().wait(Some(Duration::from_millis(1))), None);
    }

    #[test]
    fn serializes_with_reason_tag() {
        let j = serde_json::to_string(&ExitReason::TripleFault { vcpu: 1 }).unwrap();
        assert_eq!(j, r#"{"reason":"triple_fault","vcpu":1}"#);
    }
}
