//! Finds what a direct kernel boot needs inside a disk image, without mounting it: the kernel,
//! the initrd and the root device. The partition table (MBR or GPT, or none: a bare file
//! system) is read by [`partitions`]; each ext4 candidate is opened with the `ext4-view` crate
//! (a maintained pure-Rust, read-only ext2/3/4 reader) and searched for `/boot/vmlinuz-*` and
//! its matching `initrd.img-*` or Red Hat's `initramfs-*.img` (or, on a separate /boot
//! partition, `/vmlinuz-*` at its root). The image's own kernel arguments come from its boot
//! loader's configuration ([`boot_config`]). The root device is the image's own `root=` when it
//! is stable across disk buses (LVM, btrfs subvolumes, labels, UUIDs); else the ext4 root's
//! file-system UUID (`root=UUID=...`), so disk naming in the guest does not matter
//! ([`kargs::choose_root`]).

pub mod bls;
pub mod boot_config;
pub mod grub;
pub mod kargs;
pub mod partitions;

use std::cmp::Ordering;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};

/// Upper bounds on what is read into memory from an untrusted image.
const MAX_KERNEL: u64 = 256 << 20;
const MAX_INITRD: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BootImageError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Partitions(#[from] partitions::PartitionError),
    #[error(
        "no kernel found: looked for /boot/vmlinuz-* in {searched} ext4 file system(s) of the \
         image; a source without a kernel needs a boot loader, which kiln does not run"
    )]
    NoKernel { searched: usize },
    #[error("{what} {path} is {size} bytes, more than the {limit} kiln accepts")]
    TooLarge {
        what: &'static str,
        path: String,
        size: u64,
        limit: u64,
    },
    #[error("reading {path} from the image's ext4 file system: {reason}")]
    Ext4 { path: String, reason: String },
}

/// Random-access reads of a disk image's guest-visible bytes.
pub trait ImageRead: Send + Sync {
    fn size(&self) -> u64;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// A raw image file.
pub struct RawImage(pub File);

impl ImageRead for RawImage {
    fn size(&self) -> u64 {
        self.0.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
    }
}

/// Any kiln-disk block device (qcow2 chains included).
pub struct DeviceImage(pub Arc<dyn kiln_disk::BlockDevice>);

impl ImageRead for DeviceImage {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// What was found.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub kernel_version: String,
    /// For the kernel command line: `root=` value.
    pub root: String,
    /// The image's own kernel arguments kiln keeps ([`kargs::kept`]), in their order.
    pub args: Vec<String>,
    /// The configuration file they came from (a path in the image), if any.
    pub args_from: Option<String>,
    /// The partition holding the kernel (None: the whole disk is the file system).
    pub partition: Option<u32>,
}

/// A window of an image, as ext4-view reads it.
struct Window {
    img: Arc<dyn ImageRead>,
    offset: u64,
    len: u64,
}

impl Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte
            .checked_add(dst.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or("read past the end of the partition")?;
        let _ = end;
        self.img
            .read_exact_at(dst, self.offset + start_byte)
            .map_err(|e| Box::new(e) as _)
    }
}

fn is_ext(img: &dyn ImageRead, offset: u64) -> bool {
    // The ext2/3/4 superblock is at byte 1024; its magic 0xEF53 at offset 56 within.
    let mut m = [0u8; 2];
    img.read_exact_at(&mut m, offset + 1024 + 56).is_ok() && m == [0x53, 0xEF]
}

/// Compares version strings numerically where they are numbers ("6.1.0-10" < "6.1.0-9"? no:
/// 10 > 9), for picking the newest kernel.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 {
                out.push(rest[..digits].parse::<u64>().map_err(|_| &rest[..digits]));
                rest = &rest[digits..];
            } else {
                let n = rest
                    .char_indices()
                    .find(|(_, c)| c.is_ascii_digit())
                    .map(|(i, _)| i)
                    .unwrap_or(rest.len());
                out.push(Err(&rest[..n]));
                rest = &rest[n..];
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            (Err(x), Err(y)) => x.cmp(y),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

struct Candidate {
    partition: Option<u32>,
    fs: Ext4,
}

/// Searches the image for a kernel, its initrd and the root file system.
pub fn find_boot(img: Arc<dyn ImageRead>) -> Result<BootInfo, BootImageError> {
    let size = img.size();
    let mut head = vec![0u8; (34 * 512).min(size as usize)];
    img.read_exact_at(&mut head, 0)?;
    let img2 = img.clone();
    let parts = partitions::parse(&head, size, &mut |off, buf| {
        img2.read_exact_at(buf, off).is_ok()
    })?;

    let mut windows: Vec<(Option<u32>, u64, u64)> = Vec::new();
    if is_ext(img.as_ref(), 0) {
        windows.push((None, 0, size));
    }
    for p in &parts {
        if is_ext(img.as_ref(), p.offset) {
            windows.push((Some(p.number), p.offset, p.len));
        }
    }
    let mut cands = Vec::new();
    for (partition, offset, len) in windows {
        let w = Window {
            img: img.clone(),
            offset,
            len,
        };
        match Ext4::load(Box::new(w)) {
            Ok(fs) => cands.push(Candidate { partition, fs }),
            Err(e) => tracing::debug!(?partition, "not a readable ext4 file system: {e}"),
        }
    }

    // The root: the file system with /etc/os-release (or /etc/fstab); else the kernel's own.
    let root_fs = cands.iter().position(|c| {
        c.fs.exists("/etc/os-release").unwrap_or(false)
            || c.fs.exists("/etc/fstab").unwrap_or(false)
    });
    for c in &cands {
        for dir in ["/boot", "/"] {
            let Some(v) = newest_kernel(&c.fs, dir) else {
                continue;
            };
            let kpath = join(dir, &format!("vmlinuz-{v}"));
            let kernel = read_bounded(&c.fs, &kpath, "kernel", MAX_KERNEL)?;
            // Debian's name, then Red Hat's.
            let ipath = [format!("initrd.img-{v}"), format!("initramfs-{v}.img")]
                .into_iter()
                .map(|n| join(dir, &n))
                .find(|p| c.fs.exists(p.as_str()).unwrap_or(false));
            let initrd = match ipath {
                Some(p) => Some(read_bounded(&c.fs, &p, "initrd", MAX_INITRD)?),
                None => None,
            };
            let root_c = root_fs.map(|r| &cands[r]);
            let found = boot_config::find(&c.fs, dir, root_c.map(|r| &r.fs), &v);
            let (args, args_from, root) = image_args(found, root_c, &c.fs);
            return Ok(BootInfo {
                kernel,
                initrd,
                kernel_version: v,
                root,
                args,
                args_from,
                partition: c.partition,
            });
        }
    }
    Err(BootImageError::NoKernel {
        searched: cands.len(),
    })
}

/// The image's arguments kiln keeps, where they came from, and the root device (see
/// [`kargs::choose_root`]); `boot` holds the kernel (the root's fallback).
fn image_args(
    found: Option<boot_config::ImageArgs>,
    root: Option<&Candidate>,
    boot: &Ext4,
) -> (Vec<String>, Option<String>, String) {
    let found_root = root.map(|r| format!("UUID={}", r.fs.uuid()));
    let fallback = format!("UUID={}", boot.uuid());
    let Some(found) = found else {
        return (Vec::new(), None, found_root.unwrap_or(fallback));
    };
    let root = kargs::choose_root(
        kargs::image_root(&found.args),
        found_root.as_deref(),
        &fallback,
    );
    let args = match kargs::bounded(kargs::kept(&found.args)) {
        Ok(a) => a,
        Err(len) => {
            tracing::warn!(
                from = found.from,
                "the image's kernel arguments are ignored: {len} bytes, more than the {} \
                 kiln keeps",
                kargs::MAX_ARGS_LEN
            );
            Vec::new()
        }
    };
    tracing::info!(
        from = found.from,
        root,
        "the image's own kernel arguments kept: {}",
        kargs::render(&args)
    );
    (args, Some(found.from), root)
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn newest_kernel(fs: &Ext4, dir: &str) -> Option<String> {
    let rd = fs.read_dir(dir).ok()?;
    let mut versions: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .as_str()
                .ok()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| compare_versions(a, b));
    versions.pop()
}

fn read_bounded(
    fs: &Ext4,
    path: &str,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, BootImageError> {
    let e = |reason: String| BootImageError::Ext4 {
        path: path.to_string(),
        reason,
    };
    let md = fs.metadata(path).map_err(|x| e(x.to_string()))?;
    if md.len() > limit {
        return Err(BootImageError::TooLarge {
            what,
            path: path.into(),
            size: md.len(),
            limit,
        });
    }
    fs.read(path).map_err(|x| e(x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn version_order() {
        assert_eq!(
            compare_versions("6.1.0-10-cloud", "6.1.0-9-cloud"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("5.10.0", "6.1.0"), Ordering::Less);
        assert_eq!(compare_versions("6.1", "6.1"), Ordering::Equal);
        assert_eq!(compare_versions("6.1.0", "6.1"), Ordering::Greater);
    }

    fn mkfs(dir: &std::path::Path, img: &std::path::Path, size: &str) -> bool {
        match Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(dir)
            .arg(img)
            .arg(size)
            .status()
        {
            Ok(s) => s.success(),
            Err(_) => false,
        }
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("boot")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/os-release"), "ID=debian\n").unwrap();
        std::fs::write(r.join("boot/vmlinuz-6.1.0-9-cloud-amd64"), b"old kernel").unwrap();
        std::fs::write(r.join("boot/vmlinuz-6.1.0-10-cloud-amd64"), b"new kernel").unwrap();
        std::fs::write(
            r.join("boot/initrd.img-6.1.0-10-cloud-amd64"),
            b"new initrd",
        )
        .unwrap();
        d
    }

    #[test]
    fn finds_kernel_on_a_bare_ext4_disk() {
        let t = tree();
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.raw");
        if !mkfs(t.path(), &img, "16M") {
            eprintln!("SKIP: mkfs.ext4 (e2fsprogs) is not available");
            return;
        }
        let f = File::open(&img).unwrap();
        let b = find_boot(Arc::new(RawImage(f))).unwrap();
        assert_eq!(b.kernel, b"new kernel");
        assert_eq!(b.initrd.as_deref(), Some(&b"new initrd"[..]));
        assert_eq!(b.kernel_version, "6.1.0-10-cloud-amd64");
        assert_eq!(b.partition, None);
        assert!(b.root.starts_with("UUID="), "{}", b.root);
    }

    #[test]
    fn finds_kernel_in_an_mbr_partition() {
        let t = tree();
        let d = tempfile::tempdir().unwrap();
        let fsimg = d.path().join("fs.raw");
        if !mkfs(t.path(), &fsimg, "16M") {
            eprintln!("SKIP: mkfs.ext4 (e2fsprogs) is not available");
            return;
        }
        let fsbytes = std::fs::read(&fsimg).unwrap();
        let start = 2048u32;
        let mut disk = partitions::tests::mbr_with(&[(0x83, start, (fsbytes.len() / 512) as u32)]);
        disk.resize(start as usize * 512, 0);
        disk.extend_from_slice(&fsbytes);
        let img = d.path().join("disk.raw");
        std::fs::write(&img, &disk).unwrap();
        let b = find_boot(Arc::new(RawImage(File::open(&img).unwrap()))).unwrap();
        assert_eq!(b.kernel, b"new kernel");
        assert_eq!(b.partition, Some(1));
    }

    #[test]
    fn no_kernel_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("zero.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let err = find_boot(Arc::new(RawImage(File::open(&img).unwrap()))).unwrap_err();
        assert!(
            matches!(err, BootImageError::NoKernel { searched: 0 }),
            "{err}"
        );
    }
}
