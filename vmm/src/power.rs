//! The VM's ways to end itself: the i8042 keyboard controller's CPU reset (command 0xFE on
//! port 0x64, vm-superio's device) and kiln's ACPI power port, which the FADT names as the
//! hardware-reduced sleep control register (S5 = poweroff) and the reset register.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::arch::x86_64::layout::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};
use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Ends the VM with a fixed reason when triggered.
pub struct ExitTrigger {
    pub signal: Arc<ExitSignal>,
    pub reason: ExitReason,
}

impl Trigger for ExitTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.signal.request(self.reason.clone());
        Ok(())
    }
}

/// The i8042 on ports 0x60..=0x64 (inserted at 0x60 with length 5).
pub struct I8042(pub I8042Device<ExitTrigger>);

impl I8042 {
    pub fn new(signal: Arc<ExitSignal>) -> I8042 {
        I8042(I8042Device::new(ExitTrigger {
            signal,
            reason: ExitReason::Reset,
        }))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

const SLP_EN: u8 = 1 << 5;

/// kiln's ACPI power port (one byte).
pub struct AcpiPower {
    pub signal: Arc<ExitSignal>,
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: the wake status bit is never set; the guest does not wake.
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v == ACPI_RESET_VALUE {
            self.signal.request(ExitReason::Reset);
        } else if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE {
            self.signal.request(ExitReason::Poweroff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset() {
        let s = Arc::new(ExitSignal::new());
        let mut k = I8042::new(s.clone());
        k.write(0, &[0xfe]);
        assert_eq!(s.get(), None, "0xfe on the data port is not a reset");
        let mut st = [0xffu8];
        k.read(4, &mut st);
        assert_eq!(st[0] & 2, 0, "input buffer reads empty");
        k.write(4, &[0xfe]);
        assert_eq!(s.get(), Some(ExitReason::Reset));
    }

    #[test]
    fn acpi_power_port() {
        let s = Arc::new(ExitSignal::new());
        let mut p = AcpiPower { signal: s.clone() };
        p.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        assert_eq!(s.get(), None);
        p.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(s.get(), Some(ExitReason::Poweroff));
        let s = Arc::new(ExitSignal::new());
        let mut p = AcpiPower { signal: s.clone() };
        p.write(0, &[0xfe]);
        assert_eq!(s.get(), Some(ExitReason::Reset));
    }
}
