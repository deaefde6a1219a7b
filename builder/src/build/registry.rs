//! The VMs running now ([`VmRegistry`]), so that a timeout, Ctrl-C or another VM's failure
//! can stop all of them at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::engine::RunningVm;

/// A running VM shared between its build thread and whoever must stop it.
pub type SharedVm = Arc<Mutex<Box<dyn RunningVm>>>;

/// The VMs running now, so a cancel can stop all of them.
#[derive(Default, Clone)]
pub struct VmRegistry(Arc<Mutex<BTreeMap<String, SharedVm>>>);

impl VmRegistry {
    /// Adds `vm` until the returned guard drops.
    pub(super) fn add<'a>(&'a self, name: &'a str, vm: SharedVm) -> Registered<'a> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), vm);
        Registered(self, name)
    }
    fn remove(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
    /// Stops every VM at once.
    pub fn kill_all(&self) {
        let vms: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for vm in vms {
            vm.lock().unwrap_or_else(|p| p.into_inner()).kill();
        }
    }
    pub fn pids(&self) -> Vec<u32> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).pids())
            .collect()
    }
}

/// A VM's place in the registry: dropping it takes the VM out.
pub(super) struct Registered<'a>(&'a VmRegistry, &'a str);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}
