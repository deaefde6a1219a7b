//! The build's errors, typed to the end: the module's ([`BuildError`]) and one VM's
//! ([`VmError`]). Each message tells its cause, as the CLI's report expects; a cancel is told
//! apart from a failure by the error's kind, never by its text.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::diskops::DiskOpError;
use crate::engine::EngineError;
use crate::guest::GuestError;
use crate::http_directory::HttpDirError;
use crate::launch::LaunchError;
use crate::provision::StepError;
use crate::sources::iso::IsoError;
use crate::sources::seed::SeedError;
use crate::sources::url::DownloadError;
use crate::sources::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("VM `{vm}`: {source}")]
    Vm {
        vm: String,
        // Boxed: a VM's error is large, and a build's result is moved often.
        #[source]
        source: Box<VmError>,
    },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("the build passed its timeout of {0:?}")]
    Timeout(Duration),
    /// Making the engine or starting the module network.
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Io(#[from] crate::path_io::PathIoError),
    #[error(transparent)]
    Prefetch(#[from] PrefetchError),
    // Boxed: a download's error is large, and a build's result is moved often.
    #[error(transparent)]
    IsoPrefetch(#[from] Box<IsoPrefetchError>),
    #[error(transparent)]
    HttpDirectory(#[from] HttpDirError),
    #[error("a VM thread panicked")]
    Panicked,
    #[error(transparent)]
    Module(#[from] crate::module::ModuleError),
    #[error(transparent)]
    RuntimeDir(#[from] crate::runtime::RuntimeDirError),
}

/// A `files` URL that could not be fetched before the build started.
// The download error is part of the message (not a `#[source]`), followed by what it means
// for the build: a chain would tell it twice.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error} (nothing was booted)", entry(.file))]
pub struct PrefetchError {
    /// The `files` entry (a file step's own entry has a private name).
    pub file: String,
    pub error: DownloadError,
}

/// An ISO that could not be had before the build started.
#[derive(Debug, thiserror::Error)]
#[error("VM `{vm}`: ISO {url}: {}", nothing_booted(.error))]
pub struct IsoPrefetchError {
    pub vm: String,
    pub url: String,
    pub error: IsoError,
}

/// The error, and that nothing was booted (a checksum mismatch says so itself).
fn nothing_booted(e: &IsoError) -> String {
    let text = e.to_string();
    if text.contains("nothing was booted") {
        text
    } else {
        format!("{text} (nothing was booted)")
    }
}

/// How a `files` entry is named to the user: file steps' entries have private names; the
/// URL names them well enough.
fn entry(file: &str) -> String {
    if file.starts_with('\0') {
        "a file step's URL".to_string()
    } else {
        format!("file `{file}`")
    }
}

/// Why one VM of the build did not make it into the module.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The build was cancelled (Ctrl-C, its timeout, another VM's failure).
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    DirectWithoutKernel(#[from] super::boot_path::DirectWithoutKernel),
    /// SeaBIOS or OVMF is not installed: found before the VM boots.
    #[error(transparent)]
    Firmware(#[from] crate::engine::firmware::FirmwareError),
    /// Making the VM's NVRAM, or capturing it into the module.
    #[error(transparent)]
    Nvram(#[from] crate::nvram::NvramError),
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// The VM's CD-ROMs or floppy.
    #[error(transparent)]
    Media(#[from] super::media::MediaError),
    #[error("disk `{disk}` is {size} bytes, smaller than its source ({base} bytes)")]
    DiskTooSmall { disk: String, size: u64, base: u64 },
    #[error(transparent)]
    Overlay(DiskOpError),
    #[error("creating {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Attaching the NICs or launching the VM.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    // The serial console's last lines follow the cause: it is part of the message, not a
    // `#[source]` (a chain would tell it again after them).
    #[error("the VM stopped before its agent answered{serial}")]
    Stopped { serial: String },
    #[error("{error}{serial}")]
    NoAgent { error: GuestError, serial: String },
    /// A VM whose boot command was typed, then never answered: the screen tells more than
    /// the serial console of an installer.
    #[error("no answer after its boot command (last screenshot {screenshot}): {error}{serial}")]
    NoAgentAfterBootCommand {
        error: GuestError,
        screenshot: String,
        serial: String,
    },
    #[error("typing the boot command: {error} (last screenshot {screenshot}){serial}")]
    BootCommand {
        error: super::boot_command::BootCommandError,
        screenshot: String,
        serial: String,
    },
    /// The serial console told a failure the VM never recovers from (no boot loader, a
    /// refused loader, GRUB's prompt, a kernel panic): reported at once, not at the timeout.
    #[error("the VM cannot boot: {cause}{serial}")]
    BootFailed { cause: String, serial: String },
    // Boxed: a step's error is the largest, and the others are moved as often.
    #[error(transparent)]
    Step(Box<StepError>),
    #[error("stopped before capture: another VM of the module failed")]
    OtherVmFailed,
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Copying the kernel and initrd into the module.
    #[error(transparent)]
    BootFiles(io::Error),
}

impl VmError {
    /// Whether, while the build is being cancelled, this error is the cancel's doing (the VM
    /// killed under a step or a wait, a wait cut short) rather than a failure of the VM's
    /// own: a step that failed and a stop for another VM's failure are reported as failures
    /// whatever else happened.
    pub fn follows_cancel(&self) -> bool {
        match self {
            VmError::Step(e) => !matches!(**e, StepError::Failed { .. }),
            VmError::OtherVmFailed => false,
            _ => true,
        }
    }
}

impl From<StepError> for VmError {
    fn from(e: StepError) -> Self {
        VmError::Step(Box::new(e))
    }
}

/// Why a VM could not be shut down for capture.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("template cleanup: {0}")]
    Cleanup(GuestError),
    #[error("power-off: {0}")]
    Poweroff(GuestError),
    #[error(
        "the VM did not power off within {0:?}; it was stopped and its disks are not captured"
    )]
    NoPoweroff(Duration),
    #[error("waiting for the VM: {0}")]
    Wait(std::io::Error),
}

/// Why one of a VM's disks could not be captured into the module.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {source}", disk.display())]
pub struct CaptureError {
    /// The disk file being written.
    pub disk: PathBuf,
    #[source]
    pub source: WriteError,
}

/// Why a captured disk could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Disk(#[from] DiskOpError),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("resolving the parent disk {}: {source}", path.display())]
    Parent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolving the modules folder: {0}")]
    ModulesFolder(#[source] io::Error),
    #[error("the module folder has no name")]
    NoModuleName,
    #[error("{} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
}
