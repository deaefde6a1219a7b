//! ACPI tables for a kiln VM: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT that
//! declares each virtio-mmio device as `LNRO0005` with its registers and interrupt.
//!
//! This is how a stock distro kernel finds virtio-mmio devices without command-line
//! declarations (which Debian's config does not enable): its `virtio_mmio` driver binds to
//! `LNRO0005` ACPI devices, as on QEMU's `microvm` machine and Firecracker in ACPI mode.
//! The tables are written into the legacy BIOS area where the kernel also scans for the
//! RSDP, and `boot_params.acpi_rsdp_addr` points at it directly.

pub mod aml;

use super::layout::{
    ACPI_ADDR, ACPI_END, ACPI_POWER_PORT, ACPI_RESET_VALUE, IOAPIC_ADDR, LAPIC_ADDR, S5_SLEEP_TYPE,
    SERIAL_IRQ, SERIAL_PORT,
};
use aml::Resource;

const OEM_ID: &[u8; 6] = b"KILN  ";
const OEM_TABLE_ID: &[u8; 8] = b"KILNVM  ";
const CREATOR_ID: &[u8; 4] = b"KILN";

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// The tables, laid out for guest-physical address [`ACPI_ADDR`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// The bytes to write at `ACPI_ADDR`.
    pub bytes: Vec<u8>,
    /// Where the RSDP is (for `boot_params.acpi_rsdp_addr` and PVH's `rsdp_paddr`).
    pub rsdp_addr: u64,
    /// Each table's signature and address, for tests and logs.
    pub tables: Vec<([u8; 4], u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the {1} bytes reserved for them")]
    TooLarge(usize, u64),
    #[error("a virtio-mmio device at {0:#x} is above 4 GiB, which Memory32Fixed cannot describe")]
    DeviceAbove4G(u64),
}

/// Sum of bytes is zero when the checksum byte is set to this.
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A standard table: 36-byte header then `body`, checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for an I/O port register of `bits`.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bits;
    g[2] = 0;
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT flags and boot-architecture bits kiln sets.
pub const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
pub const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    // The body is the FADT past its header: 276 - 36 bytes (revision 6).
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    b[at(109)..at(111)].copy_from_slice(
        &(IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).to_le_bytes(),
    );
    b[at(112)..at(116)]
        .copy_from_slice(&(FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP).to_le_bytes());
    b[at(116)..at(128)].copy_from_slice(&gas_io(ACPI_POWER_PORT, 8));
    b[at(128)] = ACPI_RESET_VALUE;
    b[at(131)] = 5; // FADT minor version: 6.5
    b[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    // Hardware-reduced ACPI powers off through the sleep control register.
    b[at(244)..at(256)].copy_from_slice(&gas_io(ACPI_POWER_PORT, 8));
    b[at(256)..at(268)].copy_from_slice(&gas_io(ACPI_POWER_PORT, 8));
    b[at(268)..at(276)].copy_from_slice(b"KILNVMM\0");
    sdt(b"FACP", 6, &b)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: an 8259 pair is present
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, processor UID, APIC ID, enabled.
        b.extend_from_slice(&[0, 8, id, id]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    b.extend_from_slice(&[1, 12, 0, 0]);
    b.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    sdt(b"APIC", 6, &b)
}

fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut sb = Vec::new();
    sb.push(aml::device(
        "COM1",
        &[
            aml::name_decl("_HID", aml::string("PNP0501")),
            aml::name_decl("_UID", aml::integer(0)),
            aml::name_decl(
                "_CRS",
                aml::resource_template(&[
                    Resource::Io {
                        port: SERIAL_PORT,
                        len: 8,
                    },
                    Resource::Interrupt {
                        gsi: SERIAL_IRQ,
                        edge: true,
                    },
                ]),
            ),
        ],
    ));
    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.base).map_err(|_| AcpiError::DeviceAbove4G(d.base))?;
        let len = u32::try_from(d.len).map_err(|_| AcpiError::DeviceAbove4G(d.base))?;
        sb.push(aml::device(
            &format!("V{i:03X}"),
            &[
                aml::name_decl("_HID", aml::string("LNRO0005")),
                aml::name_decl("_UID", aml::integer(i as u64)),
                // Cache-coherent DMA: guest memory is ordinary host memory.
                aml::name_decl("_CCA", aml::integer(1)),
                aml::name_decl(
                    "_CRS",
                    aml::resource_template(&[
                        Resource::Memory32Fixed { base, len },
                        // irqfd pulses the line: edge-triggered.
                        Resource::Interrupt {
                            gsi: d.gsi,
                            edge: true,
                        },
                    ]),
                ),
            ],
        ));
    }
    let mut body = aml::scope("\\_SB", &sb);
    let s5 = u64::from(S5_SLEEP_TYPE);
    body.extend(aml::name_decl(
        "\\_S5",
        aml::package(&[
            aml::integer(s5),
            aml::integer(s5),
            aml::integer(0),
            aml::integer(0),
        ]),
    ));
    Ok(sdt(b"DSDT", 6, &body))
}

fn align8(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
}

/// Build the tables for `vcpus` vCPUs and `devices`.
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = ACPI_ADDR;
    let xsdt_addr = rsdp_addr + 64;
    // XSDT: header + 2 pointers (FADT, MADT); the DSDT is reached through the FADT.
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = xsdt_addr + ((xsdt_len + 7) & !7);
    let fadt_len = 276;
    let madt_addr = fadt_addr + ((fadt_len + 7) & !7);
    let madt = madt(vcpus);
    let dsdt_addr = madt_addr + ((madt.len() as u64 + 7) & !7);
    let dsdt = dsdt(devices)?;
    let fadt = fadt(dsdt_addr);

    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision 2: ACPI 2.0+ with an XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut bytes = rsdp;
    bytes.resize((xsdt_addr - rsdp_addr) as usize, 0);
    bytes.extend_from_slice(&xsdt);
    align8(&mut bytes);
    bytes.extend_from_slice(&fadt);
    align8(&mut bytes);
    bytes.extend_from_slice(&madt);
    align8(&mut bytes);
    bytes.extend_from_slice(&dsdt);
    let room = ACPI_END - ACPI_ADDR;
    if bytes.len() as u64 > room {
        return Err(AcpiError::TooLarge(bytes.len(), room));
    }
    Ok(AcpiTables {
        bytes,
        rsdp_addr,
        tables: vec![
            (*b"XSDT", xsdt_addr),
            (*b"FACP", fadt_addr),
            (*b"APIC", madt_addr),
            (*b"DSDT", dsdt_addr),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + 0x1000 * i as u64,
                len: 0x200,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
        let off = (addr - ACPI_ADDR) as usize;
        let len = u32::from_le_bytes(t.bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        &t.bytes[off..off + len]
    }

    #[test]
    fn rsdp_points_to_xsdt_and_checksums_hold() {
        let t = build(2, &devs(3)).unwrap();
        let r = &t.bytes[..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[15], 2);
        assert_eq!(r[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, 0xe0040);
        for (sig, addr) in &t.tables {
            let tb = table_at(&t, *addr);
            assert_eq!(&tb[..4], sig);
            assert_eq!(tb.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "{sig:?}");
        }
        let x = table_at(&t, xsdt_addr);
        let fadt = u64::from_le_bytes(x[36..44].try_into().unwrap());
        let madt = u64::from_le_bytes(x[44..52].try_into().unwrap());
        assert_eq!(&table_at(&t, fadt)[..4], b"FACP");
        assert_eq!(&table_at(&t, madt)[..4], b"APIC");
    }

    #[test]
    fn fadt_known_fields() {
        let t = build(1, &[]).unwrap();
        let f = table_at(&t, t.tables[1].1);
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_eq!(flags, (1 << 20) | (1 << 10));
        // Reset register: system I/O, 8 bits, port 0x600; value 0xfe.
        assert_eq!(&f[116..128], &[1, 8, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f[128], 0xfe);
        let dsdt = u64::from_le_bytes(f[140..148].try_into().unwrap());
        assert_eq!(dsdt, t.tables[3].1);
        assert_eq!(&f[244..256], &[1, 8, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let t = build(4, &[]).unwrap();
        let m = table_at(&t, t.tables[2].1);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let mut entries = &m[44..];
        let mut lapics = vec![];
        let mut ioapic = None;
        while !entries.is_empty() {
            let (ty, len) = (entries[0], entries[1] as usize);
            match ty {
                0 => lapics.push((entries[2], entries[3], entries[4])),
                1 => ioapic = Some(u32::from_le_bytes(entries[4..8].try_into().unwrap())),
                _ => panic!("unexpected MADT entry {ty}"),
            }
            entries = &entries[len..];
        }
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(ioapic, Some(0xfec0_0000));
    }

    #[test]
    fn dsdt_declares_virtio_mmio_devices() {
        let t = build(1, &devs(2)).unwrap();
        let d = table_at(&t, t.tables[3].1);
        let hay = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(hay(b"LNRO0005\0"), 2);
        assert_eq!(hay(b"V000"), 1);
        assert_eq!(hay(b"V001"), 1);
        assert_eq!(hay(&[0x86, 9, 0, 1, 0, 0x10, 0, 0xd0, 0, 2, 0, 0]), 1);
        assert_eq!(hay(&[0x89, 6, 0, 3, 1, 6, 0, 0, 0]), 1);
        assert_eq!(hay(b"_S5_"), 1);
        assert_eq!(hay(b"PNP0501\0"), 1);
    }

    #[test]
    fn devices_above_4g_are_refused() {
        let d = [MmioDevice {
            base: 1 << 32,
            len: 0x200,
            gsi: 5,
        }];
        assert!(matches!(build(1, &d), Err(AcpiError::DeviceAbove4G(_))));
    }

    /// If `iasl` (acpica-tools) is installed, it must disassemble every table cleanly.
    #[test]
    fn iasl_disassembles_tables() {
        let Ok(out) = std::process::Command::new("iasl").arg("-v").output() else {
            eprintln!("SKIP: iasl (acpica-tools) is not installed");
            return;
        };
        assert!(out.status.success() || !out.stdout.is_empty());
        let t = build(2, &devs(2)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (sig, addr) in &t.tables {
            let name = String::from_utf8_lossy(sig).to_lowercase();
            let path = dir.path().join(format!("{name}.dat"));
            std::fs::write(&path, table_at(&t, *addr)).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {name}: {text}");
            let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
            if sig == b"DSDT" {
                assert!(dsl.contains("LNRO0005"), "{dsl}");
                assert!(dsl.contains("Memory32Fixed"), "{dsl}");
                assert!(dsl.contains("0xD0001000"), "{dsl}");
            }
            assert!(!text.contains("Error"), "{name}: {text}");
        }
    }
}
