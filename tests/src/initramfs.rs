//! A newc initramfs for real-guest tests: static busybox, kernel modules with their
//! dependencies, extra files and an `/init` script.
//!
//! The kernel package carries no `modules.dep` (depmod runs at install time, and kiln
//! installs nothing), so dependencies come from each module's own `.modinfo` section
//! (`depends=a,b`), read straight from the ELF file.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::kernel::KernelFiles;
use crate::{KitError, Result};

/// Where the host's static busybox lives (Debian package busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// Builder for an initramfs image.
#[derive(Default)]
pub struct Initramfs {
    busybox: bool,
    modules: Vec<String>,
    modules_dir: Option<PathBuf>,
    files: Vec<(String, Vec<u8>, u32)>,
    init: Option<String>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Include `/bin/busybox`; `/init` installs its applet links first thing.
    pub fn busybox(mut self) -> Self {
        self.busybox = true;
        self
    }

    /// Take modules from this kernel.
    pub fn kernel(mut self, k: &KernelFiles) -> Self {
        self.modules_dir = Some(k.modules_dir.clone());
        self
    }

    /// Load this module (and, before it, what it depends on) at boot.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.replace('-', "_"));
        self
    }

    /// Add a file at `path` (absolute, inside the guest) with `mode` permission bits.
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files
            .push((path.trim_start_matches('/').to_string(), data.into(), mode));
        self
    }

    /// The body of `/init`, a busybox `sh` script. It runs after a preamble that installs
    /// the busybox applets, mounts /proc, /sys and /dev and insmods the modules in order.
    pub fn init_script(mut self, body: &str) -> Self {
        self.init = Some(body.to_string());
        self
    }

    /// Write the image (uncompressed newc cpio) to `out`, through a temp name.
    pub fn build(self, out: &Path) -> Result<()> {
        let order = match (&self.modules_dir, self.modules.is_empty()) {
            (_, true) => Vec::new(),
            (Some(dir), false) => resolve(dir, &self.modules)?,
            (None, false) => {
                return Err(KitError::Other(
                    "modules requested without .kernel()".into(),
                ))
            }
        };
        let mut entries: Vec<(String, Vec<u8>, u32)> = Vec::new();
        let mut dirs: Vec<String> = [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "proc",
            "sys",
            "dev",
            "tmp",
            "lib",
            "lib/modules",
            "etc",
            "mnt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.busybox {
            let bb = std::fs::read(BUSYBOX).map_err(KitError::io(format!("read {BUSYBOX}")))?;
            entries.push(("bin/busybox".into(), bb, 0o755));
        }
        let mut insmods = String::new();
        for (name, path) in &order {
            let data =
                std::fs::read(path).map_err(KitError::io(format!("read {}", path.display())))?;
            entries.push((format!("lib/modules/{name}.ko"), data, 0o644));
            insmods.push_str(&format!(
                "insmod /lib/modules/{name}.ko || echo \"kiln-init: insmod {name} failed\"\n"
            ));
        }
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n\
             {insmods}\
             {}\n",
            self.init.as_deref().unwrap_or("poweroff -f")
        );
        entries.push(("init".into(), init.into_bytes(), 0o755));
        for (path, data, mode) in self.files {
            let mut p = Path::new(&path).parent();
            while let Some(d) = p {
                let s = d.to_string_lossy().into_owned();
                if !s.is_empty() && !dirs.contains(&s) {
                    dirs.push(s);
                }
                p = d.parent();
            }
            entries.push((path, data, mode));
        }
        dirs.sort_by_key(|d| d.matches('/').count());

        let tmp = out.with_extension("tmp");
        let file = std::fs::File::create(&tmp)
            .map_err(KitError::io(format!("create {}", tmp.display())))?;
        let mut w = std::io::BufWriter::new(file);
        let mut ino = 1u32;
        let werr = KitError::io(format!("write {}", tmp.display()));
        let res: std::io::Result<()> = (|| {
            for d in &dirs {
                ino += 1;
                let b = cpio::newc::Builder::new(d).ino(ino).mode(0o040755).nlink(2);
                b.write(&mut w, 0).finish()?;
            }
            for (path, data, mode) in &entries {
                ino += 1;
                let b = cpio::newc::Builder::new(path)
                    .ino(ino)
                    .mode(0o100000 | mode)
                    .nlink(1);
                let size = u32::try_from(data.len())
                    .map_err(|_| std::io::Error::other(format!("{path} is over 4 GiB")))?;
                let mut fw = b.write(&mut w, size);
                fw.write_all(data)?;
                fw.finish()?;
            }
            cpio::newc::trailer(&mut w)?;
            w.flush()
        })();
        res.map_err(werr)?;
        std::fs::rename(&tmp, out).map_err(KitError::io(format!("rename to {}", out.display())))?;
        Ok(())
    }
}

/// Every module named and its dependencies, each once, dependencies first.
fn resolve(dir: &Path, wanted: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut index = HashMap::new();
    index_modules(dir, &mut index)?;
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for m in wanted {
        visit(m, &index, &mut done, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &HashMap<String, PathBuf>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        return Err(KitError::Other(format!(
            "module dependency cycle through {name}"
        )));
    }
    let path = index
        .get(name)
        .ok_or_else(|| KitError::ModuleMissing(name.to_string()))?;
    stack.push(name.to_string());
    for dep in module_depends(path)? {
        visit(&dep, index, done, stack, order)?;
    }
    stack.pop();
    done.insert(name.to_string());
    order.push((name.to_string(), path.clone()));
    Ok(())
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(KitError::io(format!("list {}", dir.display())))?;
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            index_modules(&p, index)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(stem.replace('-', "_"), p.clone());
        }
    }
    Ok(())
}

/// The `depends=` list of a module's `.modinfo` section.
pub fn module_depends(path: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(path).map_err(KitError::io(format!("read {}", path.display())))?;
    let bad = |why: &str| KitError::BadModule {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let info = elf_section(&data, ".modinfo")
        .ok_or_else(|| bad("no .modinfo section (not an ELF64 module?)"))?;
    let deps = info
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .unwrap_or(b"");
    Ok(String::from_utf8_lossy(deps)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect())
}

/// The bytes of the named section of a little-endian ELF64 file.
fn elf_section<'a>(data: &'a [u8], want: &str) -> Option<&'a [u8]> {
    if data.get(0..4)? != b"\x7fELF" || *data.get(4)? != 2 || *data.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32::from_le_bytes(data.get(base..base + 4)?.try_into().ok()?);
        let off = usize::try_from(u64_at(base + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(base + 0x20)?).ok()?;
        Some((name, off, size))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = data.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = strtab.get(name as usize..)?;
        let end = name.iter().position(|b| *b == 0)?;
        if &name[..end] == want.as_bytes() {
            return data.get(off..off.checked_add(size)?);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_readable_newc_archive() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("i.cpio");
        Initramfs::new()
            .file("/etc/hello.txt", b"hi\n".to_vec(), 0o600)
            .init_script("echo hello")
            .build(&out)
            .unwrap();
        let mut f = std::fs::File::open(&out).unwrap();
        let mut seen = HashMap::new();
        loop {
            let r = cpio::newc::Reader::new(&mut f).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let name = r.entry().name().to_string();
            let mode = r.entry().mode();
            let mut data = Vec::new();
            let mut r = r;
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            r.finish().unwrap();
            seen.insert(name, (mode, data));
        }
        let (mode, init) = &seen["init"];
        assert_eq!(mode & 0o777, 0o755);
        let init = String::from_utf8_lossy(init);
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.trim_end().ends_with("echo hello"));
        assert_eq!(seen["etc/hello.txt"], (0o100600, b"hi\n".to_vec()));
        assert_eq!(seen["etc"].0 & 0o170000, 0o040000);
    }

    #[test]
    fn modules_without_kernel_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Initramfs::new()
            .module("virtio_blk")
            .build(&dir.path().join("x"))
            .unwrap_err();
        assert!(e.to_string().contains("without .kernel()"));
    }

    #[test]
    fn elf_parser_refuses_garbage() {
        assert!(elf_section(b"", ".modinfo").is_none());
        assert!(elf_section(b"\x7fELF\x02\x01", ".modinfo").is_none());
        let mut fake = vec![0u8; 64];
        fake[..6].copy_from_slice(b"\x7fELF\x02\x01");
        fake[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        fake[0x3c] = 5;
        assert!(elf_section(&fake, ".modinfo").is_none());
    }
}
