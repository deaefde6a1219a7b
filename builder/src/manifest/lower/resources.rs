//! A VM's resources (`cpu`, `memory`) against the host limits, for a VM and for its build
//! override alike.

use super::super::plan::Vm;
use super::super::units::format_bytes;
use super::super::yaml::Node;
use super::{read, Cx};

/// Flags a `cpu` or `memory` outside the limits; a value that does not read is reported by
/// the reader, not here.
pub fn check_resources(cx: &mut Cx, r: &Node, vm: &Vm) {
    let l = cx.limits;
    if let Some(at) = r.get("cpu").filter(|_| read::cpus(r, "cpu").is_some()) {
        if vm.cpus > l.max_cpus {
            cx.sink
                .error(
                    at.span,
                    format!("{} vCPUs is more than the limit of {}", vm.cpus, l.max_cpus),
                )
                .hint("lower `cpu`");
        }
    }
    if let Some(at) = r
        .get("memory")
        .filter(|_| read::bytes(r, "memory").is_some())
    {
        if vm.memory < l.min_memory {
            cx.sink
                .error(
                    at.span,
                    format!(
                        "{} of memory is too little: at least {} is needed",
                        format_bytes(vm.memory),
                        format_bytes(l.min_memory)
                    ),
                )
                .hint("memory takes a unit: 512Mi, 1Gi");
        } else if vm.memory > l.max_memory {
            cx.sink
                .error(
                    at.span,
                    format!(
                        "{} of memory is more than the limit of {}",
                        format_bytes(vm.memory),
                        format_bytes(l.max_memory)
                    ),
                )
                .hint("lower `memory`");
        }
    }
}
