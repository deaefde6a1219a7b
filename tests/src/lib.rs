//! kiln-e2e: the shared kit for kiln's real-guest and end-to-end tests.
//!
//! - [`kernel::guest_kernel`]: the Debian cloud kernel, fetched with `apt-get download` and
//!   unpacked into a cache, never installed on the host.
//! - [`firmware_image::uefi_xfs`], [`firmware_image::bios_btrfs`], [`firmware_image::uefi_secure`],
//!   [`firmware_image::uefi_unsigned`]: disk images that boot through
//!   OVMF or SeaBIOS, made from Debian packages and cached by their inputs.
//! - [`installer::installer_iso`]: a real installer CD (GRUB menu, generic kernel, busybox
//!   installer, a Debian system with sshd to install) for the ISO-install tests;
//!   [`installer::installed_disk`]: a disk it installed, cached.
//! - [`initramfs::Initramfs`]: a newc initramfs with static busybox, chosen kernel modules (in
//!   dependency order) and an `/init` script.
//! - [`qemu::Qemu`]: `qemu-system-x86_64 -accel tcg` with serial to a file, waiting for marker
//!   lines with a timeout, killed on drop.
//! - [`image::checked_contents`]: a disk image after `qemu-img check`, as qemu-img reads it.
//! - [`image::ext4_root`]: a raw disk's ext4 root as debugfs opens it (a GPT root partition at
//!   its offset, or the whole file).
//! - [`pattern::Xorshift`], [`pattern::pattern`]: seeded pseudo-random test data and choices.
//! - [`http::Server`]: a loopback HTTP server for what kiln or a guest downloads.
//! - [`module::clone_run_exec`]: a built module cloned, run and `kiln exec`'d like a user does.
//! - [`helper_process::command`]: the test binary re-run on one of its ignored helper tests.
//! - [`rfb::handshake`]: a VNC client up to ServerInit (banner, VNC authentication, screen size).
//! - [`virtio_guest::Script`]: a tiny virtio driver run by a KVM guest program, for device tests.
//! - [`kvm_or_skip`]: whether /dev/kvm opens, with the skip line when it does not.
//!
//! Tests that cannot get what they need (no qemu, no package download) call [`skip`] and
//! return: they print `SKIP: <reason>` and never pass silently.

pub mod firmware_image;
pub mod helper_process;
pub mod http;
pub mod image;
pub mod initramfs;
pub mod installer;
pub mod iso;
pub mod kernel;
pub mod module;
pub mod pattern;
pub mod pty;
pub mod qemu;
pub mod rfb;
pub mod screen;
pub mod virtio_guest;

use std::path::PathBuf;

/// What went wrong while preparing or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("command `{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("kernel module {0} not found in the kernel package")]
    ModuleMissing(String),
    #[error("kernel module {path}: {why}")]
    BadModule { path: PathBuf, why: String },
    #[error("timed out after {secs} s waiting for `{marker}`; serial output so far:\n{output}")]
    Timeout {
        marker: String,
        secs: u64,
        output: String,
    },
    #[error("guest exited before printing `{marker}`; serial output:\n{output}")]
    GuestExited { marker: String, output: String },
    #[error("{0}")]
    Other(String),
}

impl KitError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KitError {
        let what = what.into();
        move |source| KitError::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, KitError>;

/// Print the loud skip line a test emits when something it needs is absent.
pub fn skip(reason: impl std::fmt::Display) {
    eprintln!("SKIP: {reason}");
}

/// True when /dev/kvm can be opened; otherwise prints why `test` is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(format_args!("{test}: /dev/kvm cannot be opened ({e})"));
            false
        }
    }
}

/// Effective uid 0, from /proc (no libc dependency for one number).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether `prog` is an executable name on PATH, or in the sbin folders a non-login root
/// shell's PATH may lack.
/// The `kiln` binary a test or bench drives: `$KILN_BIN`, else `kiln` in the same profile
/// folder as the running test or bench (`<target>/<profile>/deps/<exe>`).
pub fn kiln_bin() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KILN_BIN").filter(|p| !p.is_empty()) {
        let p = std::path::PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let exe = std::env::current_exe().ok()?;
    let k = exe.parent()?.parent()?.join("kiln");
    k.is_file().then_some(k)
}

pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(prog).is_file())
}

/// kiln's cache directory: `$KILN_CACHE`, else `~/.cache/kiln`, else a temp-dir fallback.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("kiln");
    }
    std::env::temp_dir().join("kiln-cache")
}

/// Run a command, returning its stdout or a [`KitError::Command`] with its stderr.
pub(crate) fn run(cmd: &mut std::process::Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| KitError::Command {
        cmd: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(KitError::Command {
            cmd: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
