//! CPUID: KVM's supported set with kiln's adjustments for each vCPU.
//!
//! - leaf 1: initial APIC ID, logical processor count, CLFLUSH size, the `hypervisor` bit,
//!   HTT when there is more than one vCPU.
//! - leaf 4 (Intel deterministic cache): cores per package consistent with N vCPUs.
//! - leaf 0xb (extended topology): one thread per core, N cores in one package.
//! - leaf 0x4000_0000: the KVM hypervisor signature, so the guest uses kvm-clock and the
//!   other paravirtual features KVM reports in 0x4000_0001.
//! - leaf 6: no thermal/power management (not emulated).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// Bits needed to number `n` items (ceil(log2 n)).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjust `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu_id` of `vcpus`.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, vcpus: u8) {
    let n = u32::from(vcpus.max(1));
    let core_bits = bits_for(n);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (u32::from(vcpu_id) << 24) | ((n & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: addressable core IDs - 1; EAX[25:14]: threads sharing this
                // cache - 1 (each core has its own L1/L2; the last level is shared by all).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff)
                    | ((((1u32 << core_bits) - 1) & 0x3f) << 26)
                    | ((sharing & 0xfff) << 14);
            }
            6 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                e.edx = u32::from(vcpu_id);
                match e.index {
                    // SMT level: one thread per core.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x4000_0000 => {
                e.ebx = u32::from_le_bytes([
                    KVM_SIGNATURE[0],
                    KVM_SIGNATURE[1],
                    KVM_SIGNATURE[2],
                    KVM_SIGNATURE[3],
                ]);
                e.ecx = u32::from_le_bytes([
                    KVM_SIGNATURE[4],
                    KVM_SIGNATURE[5],
                    KVM_SIGNATURE[6],
                    KVM_SIGNATURE[7],
                ]);
                e.edx = u32::from_le_bytes([
                    KVM_SIGNATURE[8],
                    KVM_SIGNATURE[9],
                    KVM_SIGNATURE[10],
                    KVM_SIGNATURE[11],
                ]);
                e.eax = e.eax.max(0x4000_0001);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_for_four_vcpus() {
        let mut e = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x4000_0000, 0),
        ];
        e[0].ebx = 0xffff_ff42;
        e[0].edx = 0;
        adjust(&mut e, 3, 4);
        assert_eq!(e[0].ebx, 0x0304_0842);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (0, 1, 0x100, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (2, 4, 0x201, 3));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx), (0, 0, 2));
        // "KVMKVMKVM\0\0\0" as EBX/ECX/EDX.
        assert_eq!(
            (e[4].ebx, e[4].ecx, e[4].edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
    }

    #[test]
    fn single_vcpu_and_cache_leaf() {
        let mut e = vec![leaf(1, 0), leaf(4, 0), leaf(4, 3)];
        e[0].edx = LEAF1_EDX_HTT;
        e[1].eax = (1 << 5) | 0x1; // L1 data cache
        e[2].eax = (3 << 5) | 0x3; // L3 unified
        adjust(&mut e, 0, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 16, 1);
        adjust(&mut e, 0, 3);
        assert_eq!(e[1].eax, (3 << 26) | (1 << 5) | 1);
        assert_eq!(e[2].eax, (3 << 26) | (2 << 14) | (3 << 5) | 3);
    }

    #[test]
    fn bits() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
