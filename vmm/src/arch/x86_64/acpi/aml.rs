//! The little AML (ACPI Machine Language) kiln's DSDT needs: names, integers, strings,
//! packages, buffers, devices and a resource template with fixed memory and an interrupt.
//! Hand-written because the DSDT is a few hundred bytes of a fixed shape; the encoding
//! follows ACPI 6.4 chapter 20.

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;

/// Encode a PkgLength for `len` bytes of content that follow it (the encoding counts its
/// own bytes).
pub fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return out;
        }
    }
    // 2^28 bytes is far beyond any table kiln writes.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// A NameString: a root-relative or single name segment, padded with `_` to 4 chars.
/// Names with dots (`\_SB_.V000`) become a DualNamePath/MultiNamePath.
pub fn name(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let rest = if let Some(r) = path.strip_prefix('\\') {
        out.push(b'\\');
        r
    } else {
        path
    };
    let segs: Vec<[u8; 4]> = rest
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut seg = [b'_'; 4];
            for (d, c) in seg.iter_mut().zip(s.bytes()) {
                *d = c;
            }
            seg
        })
        .collect();
    match segs.len() {
        0 => out.push(0),
        1 => {}
        2 => out.push(0x2e),
        n => {
            out.push(0x2f);
            out.push(n as u8);
        }
    }
    for s in segs {
        out.extend_from_slice(&s);
    }
    out
}

/// The smallest integer encoding of `v`.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => {
            let mut o = vec![WORD_PREFIX];
            o.extend_from_slice(&(v as u16).to_le_bytes());
            o
        }
        0x1_0000..=0xffff_ffff => {
            let mut o = vec![DWORD_PREFIX];
            o.extend_from_slice(&(v as u32).to_le_bytes());
            o
        }
        _ => {
            let mut o = vec![QWORD_PREFIX];
            o.extend_from_slice(&v.to_le_bytes());
            o
        }
    }
}

pub fn string(s: &str) -> Vec<u8> {
    let mut o = vec![STRING_PREFIX];
    o.extend_from_slice(s.as_bytes());
    o.push(0);
    o
}

/// `Name(path, value)`.
pub fn name_decl(path: &str, value: Vec<u8>) -> Vec<u8> {
    let mut o = vec![NAME_OP];
    o.extend(name(path));
    o.extend(value);
    o
}

/// `Package(){ elements }`.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    let mut o = vec![PACKAGE_OP];
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Buffer(){ bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    let mut o = vec![BUFFER_OP];
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

fn scoped(prefix: &[u8], path: &str, children: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name(path);
    for c in children {
        body.extend_from_slice(c);
    }
    let mut o = prefix.to_vec();
    o.extend(pkg_length(body.len()));
    o.extend(body);
    o
}

/// `Scope(path){ children }`.
pub fn scope(path: &str, children: &[Vec<u8>]) -> Vec<u8> {
    scoped(&[SCOPE_OP], path, children)
}

/// `Device(path){ children }`.
pub fn device(path: &str, children: &[Vec<u8>]) -> Vec<u8> {
    scoped(&[EXT_OP_PREFIX, DEVICE_OP], path, children)
}

/// One resource descriptor in a resource template.
#[derive(Debug, Clone, Copy)]
pub enum Resource {
    /// `Memory32Fixed(ReadWrite, base, len)`.
    Memory32Fixed { base: u32, len: u32 },
    /// `Interrupt(ResourceConsumer, Edge|Level, ActiveHigh, Exclusive){ gsi }`.
    Interrupt { gsi: u32, edge: bool },
    /// `IO(Decode16, port, port, 1, len)`.
    Io { port: u16, len: u8 },
}

/// `ResourceTemplate(){ ... }`: a buffer of descriptors closed by an end tag.
pub fn resource_template(resources: &[Resource]) -> Vec<u8> {
    let mut b = Vec::new();
    for r in resources {
        match *r {
            Resource::Memory32Fixed { base, len } => {
                b.extend_from_slice(&[0x86, 9, 0, 1]);
                b.extend_from_slice(&base.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
            Resource::Interrupt { gsi, edge } => {
                // Flags: bit0 consumer, bit1 edge-triggered; active high, exclusive.
                let flags = 1 | (u8::from(edge) << 1);
                b.extend_from_slice(&[0x89, 6, 0, flags, 1]);
                b.extend_from_slice(&gsi.to_le_bytes());
            }
            Resource::Io { port, len } => {
                b.push(0x47);
                b.push(1); // 16-bit decode
                b.extend_from_slice(&port.to_le_bytes());
                b.extend_from_slice(&port.to_le_bytes());
                b.push(1);
                b.push(len);
            }
        }
    }
    // End tag; a zero checksum means "treat as correct".
    b.extend_from_slice(&[0x79, 0]);
    buffer(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_lengths() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 bytes + 2 length bytes = 65 = 0x41: lead 0b01 << 6 | 0x1, then 0x04.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        // 0x1000 + 3 length bytes = 0x1003: lead 0b10 << 6 | 0x3, then 0x00, 0x01.
        assert_eq!(pkg_length(0x1000), vec![0x83, 0x00, 0x01]);
    }

    #[test]
    fn names_and_integers() {
        assert_eq!(name("_HID"), b"_HID".to_vec());
        assert_eq!(name("_S5"), b"_S5_".to_vec());
        assert_eq!(name("\\_SB"), b"\\_SB_".to_vec());
        assert_eq!(name("\\_SB.V000"), b"\\\x2e_SB_V000".to_vec());
        assert_eq!(integer(0), vec![0]);
        assert_eq!(integer(1), vec![1]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x200), vec![0x0b, 0, 2]);
        assert_eq!(integer(0xd000_0000), vec![0x0c, 0, 0, 0, 0xd0]);
    }

    #[test]
    fn known_device_encoding() {
        // Device(V000){ Name(_HID, "LNRO0005") } as iasl compiles it.
        let d = device("V000", &[name_decl("_HID", string("LNRO0005"))]);
        let mut want = vec![0x5b, 0x82, 20];
        want.extend_from_slice(b"V000\x08_HID\x0dLNRO0005\x00");
        assert_eq!(d, want);
    }

    #[test]
    fn resource_template_bytes() {
        let t = resource_template(&[
            Resource::Memory32Fixed {
                base: 0xd000_0000,
                len: 0x200,
            },
            Resource::Interrupt { gsi: 5, edge: true },
        ]);
        // Buffer op, pkglen, size (0x0a 0x17 = 23 bytes), descriptors, end tag.
        assert_eq!(&t[..4], &[0x11, 26, 0x0a, 23]);
        assert_eq!(&t[4..16], &[0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 2, 0, 0]);
        assert_eq!(&t[16..25], &[0x89, 6, 0, 3, 1, 5, 0, 0, 0]);
        assert_eq!(&t[25..], &[0x79, 0]);
    }
}
