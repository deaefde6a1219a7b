//! Direct boot of a Linux kernel through linux-loader: a bzImage (64-bit boot protocol
//! entry at `startup_64`) or an ELF vmlinux (its PVH entry when it has one, else the 64-bit
//! entry), the initrd, the command line, the e820 map and the zero page or PVH start info.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::params::{self, BootParamsInput};
use super::{mem_err, BootError};
use crate::arch::x86_64::e820;
use crate::arch::x86_64::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR,
    PVH_MEMMAP_MAX, ZERO_PAGE_ADDR,
};
use crate::arch::x86_64::regs::BootMode;

/// Offset of the 64-bit entry (`startup_64`) in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `initrd_addr_max` assumed for kernels whose header predates the field.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// `xloadflags` bit: the kernel has a 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1;

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// What was loaded, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub mode: BootMode,
    pub kind: KernelKind,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    BzImage,
    ElfPvh,
    Elf64,
}

fn kernel_err(path: &Path, detail: impl ToString) -> BootError {
    BootError::Kernel {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Load `spec` into `mem` (of `mem_size` bytes), with the ACPI RSDP at `rsdp_addr`; return
/// how the boot vCPU must start.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    spec: &KernelSpec,
    rsdp_addr: u64,
) -> Result<Loaded, BootError> {
    let mut f = open(&spec.kernel)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|e| kernel_err(&spec.kernel, format!("reading its first bytes: {e}")))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| kernel_err(&spec.kernel, e))?;
    let is_elf = magic == *b"\x7fELF";
    let himem = Some(GuestAddress(HIMEM_START));
    let result = if is_elf {
        Elf::load(mem, None, &mut f, himem).map_err(|e| kernel_err(&spec.kernel, e))?
    } else {
        BzImage::load(mem, None, &mut f, himem).map_err(|e| kernel_err(&spec.kernel, e))?
    };

    // Command line, NUL-terminated.
    if spec.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the limit is {}",
            spec.cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if spec.cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("it contains a NUL byte".into()));
    }
    let mut cl = spec.cmdline.as_bytes().to_vec();
    cl.push(0);
    mem.write_slice(&cl, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("the command line"))?;

    let low_end = mem_size.min(MMIO_GAP_START);
    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match &spec.initrd {
        None => None,
        Some(path) => {
            let mut f = open(path)?;
            let size = f
                .metadata()
                .map_err(|source| BootError::Io {
                    path: path.display().to_string(),
                    source,
                })?
                .len();
            let limit = low_end.min(initrd_max.saturating_add(1));
            let addr = params::initrd_address(size, limit, result.kernel_end)
                .ok_or(BootError::InitrdTooLarge { size, limit })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(mem_err("the initrd"))?;
            Some((addr, size))
        }
    };

    let map = e820::memory_map(mem_size);
    let (mode, kind) = match (is_elf, result.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            let (info, memmap) =
                params::pvh_start_info(CMDLINE_ADDR, rsdp_addr, PVH_MEMMAP_ADDR, &map);
            if memmap.len() > PVH_MEMMAP_MAX {
                return Err(kernel_err(&spec.kernel, "too many memory map entries"));
            }
            mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
                .map_err(mem_err("the PVH start info"))?;
            for (i, e) in memmap.iter().enumerate() {
                mem.write_obj(*e, GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64))
                    .map_err(mem_err("the PVH memory map"))?;
            }
            let eip = u32::try_from(entry.0)
                .map_err(|_| kernel_err(&spec.kernel, "PVH entry above 4 GiB"))?;
            (
                BootMode::Protected {
                    eip,
                    ebx: PVH_INFO_ADDR as u32,
                },
                KernelKind::ElfPvh,
            )
        }
        (elf, _) => {
            let header = result.setup_header;
            if let Some(h) = header {
                let version = h.version;
                if version < 0x0206 {
                    return Err(BootError::OldBootProtocol(version));
                }
                let xlf = h.xloadflags;
                if xlf & XLF_KERNEL_64 == 0 {
                    return Err(kernel_err(
                        &spec.kernel,
                        "the bzImage has no 64-bit entry point",
                    ));
                }
            }
            let zp = params::boot_params(&BootParamsInput {
                header,
                cmdline_addr: CMDLINE_ADDR,
                cmdline_len: spec.cmdline.len() as u32,
                initrd,
                e820: &map,
                rsdp_addr,
            });
            mem.write_obj(zp, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(mem_err("the zero page"))?;
            let rip = if elf {
                result.kernel_load.0
            } else {
                result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            (
                BootMode::Long {
                    rip,
                    rsi: ZERO_PAGE_ADDR,
                },
                if elf {
                    KernelKind::Elf64
                } else {
                    KernelKind::BzImage
                },
            )
        }
    };
    Ok(Loaded {
        mode,
        kind,
        kernel_end: result.kernel_end,
        initrd,
    })
}
