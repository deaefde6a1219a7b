//! Finding a static agent binary on the host. kiln itself carries its agent (embedded at
//! build time, see kiln-builder's `agent_binary`); this lookup is its fallback for a kiln
//! built without one, and what the agent's own tests use.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Find the static guest agent: `$KILN_AGENT_BIN`, then `kiln-agent` beside the current
/// executable, then `../agent/kiln-agent` relative to it (where kiln's build makes it:
/// `target/agent/kiln-agent` next to `target/release/kiln`). Candidates that are dynamically
/// linked (the workspace's ordinary build of the binary) are skipped: they would not run on
/// another distro's libc.
pub fn locate_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_AGENT_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("kiln-agent"), dir.join("../agent/kiln-agent")]
        .into_iter()
        .find(|c| is_static_elf(c))
}

/// True when `p` is an x86-64 ELF executable with no program interpreter (PT_INTERP),
/// i.e. statically linked.
pub fn is_static_elf(p: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    // The program headers of any binary we produce sit in the first pages.
    let mut buf = Vec::new();
    if f.by_ref().take(64 * 1024).read_to_end(&mut buf).is_err() {
        return false;
    }
    elf_is_static(&buf).unwrap_or(false)
}

fn elf_is_static(b: &[u8]) -> Option<bool> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // ELF magic, 64-bit, little-endian, x86-64.
    if b.get(0..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 || u16_at(18)? != 62 {
        return Some(false);
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = u16_at(54)? as usize;
    let phnum = u16_at(56)? as usize;
    if phentsize < 56 {
        return Some(false);
    }
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(o)? == 3 {
            return Some(false); // PT_INTERP: needs a dynamic loader
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_not_static() {
        // The test binary itself is dynamically linked (the workspace has no crt-static).
        let exe = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&exe));
        assert!(!is_static_elf(Path::new("/nonexistent")));
        assert_eq!(elf_is_static(b"\x7fELF"), None);
        assert_eq!(elf_is_static(b"#!/bin/sh\n"), Some(false));
    }
}
