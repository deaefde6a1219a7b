//! COM1: vm-superio's 16550 on port 0x3f8, interrupting through an irqfd on GSI 4, writing
//! to a log file and, when asked, to the terminal; terminal input is fed back when the
//! console is interactive.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes: any of a log file, the terminal, and an in-memory capture
/// (tests and the embedding API read it).
#[derive(Default)]
pub struct ConsoleOutput {
    pub log: Option<File>,
    pub terminal: bool,
    pub capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &mut self.log {
            // A full disk must not stop the guest: the console is best-effort.
            let _ = f.write_all(buf);
        }
        if self.terminal {
            let mut out = io::stdout().lock();
            let _ = out.write_all(buf);
            let _ = out.flush();
        }
        if let Some(c) = &self.capture {
            // Bound the capture so a chatty guest cannot grow the VMM without limit.
            let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
            if c.len() < CAPTURE_LIMIT {
                let n = buf.len().min(CAPTURE_LIMIT - c.len());
                c.extend_from_slice(&buf[..n]);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.log {
            let _ = f.flush();
        }
        Ok(())
    }
}

/// Most console bytes kept in memory.
pub const CAPTURE_LIMIT: usize = 4 << 20;

/// The 16550 as a bus device.
pub struct SerialDevice {
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOutput) -> SerialDevice {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Feed terminal input to the guest; returns how many bytes the FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_capture_and_interrupt_fires() {
        let cap = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleOutput {
                capture: Some(cap.clone()),
                ..Default::default()
            },
        );
        // Enable the "transmitter empty" interrupt (IER bit 1), then send two bytes.
        s.write(1, &[0x02]);
        s.write(0, b"o");
        s.write(0, b"k");
        assert_eq!(&*cap.lock().unwrap(), b"ok");
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }
}
