//! The PIO and MMIO buses: address ranges mapped to devices, which vCPU exits are
//! dispatched to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Address ranges to devices. Lookups take a read lock, so vCPUs dispatch in parallel; a
/// device is locked only while its own handler runs.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Map `[base, base + len)` to `device`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let mut r = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let before = r.range(..end).next_back();
        if let Some((b, (l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        r.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let r = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, (len, dev)) = r.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fall inside the device's range.
        if off.checked_add(size as u64)? <= *len {
            Some((off, dev.clone()))
        } else {
            None
        }
    }

    /// Dispatch a read; false if no device claims the address (data is left as is).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; false if no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(vec![0; 8])));
        bus.insert(dev.clone(), 0x100, 8).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [1, 2]);
        assert!(!bus.read(0x107, &mut b), "straddles the end");
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(!bus.write(0x108, &[0]));
    }

    #[test]
    fn overlaps_are_refused() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Reg(vec![0; 16]))) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf8, 0x10).is_err());
        assert!(bus.insert(d(), 0x50, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x110, 0x10).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
