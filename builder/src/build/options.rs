//! What a build is asked to do ([`BuildOptions`], [`OnError`]) and the state its caller shares
//! with it ([`BuildContext`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::registry::VmRegistry;
use crate::cache::Cache;
use crate::engine::EngineChoice;
use crate::events::EventSink;
use crate::network::Internet;

/// What to do when a build fails, in Packer's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Stop every VM and remove the partial module (its logs are kept).
    Cleanup,
    /// Stop every VM and keep the partial module's folder (the VMs' disks) where the build
    /// says; the logs are kept as with cleanup. `keep` is the name this had before.
    #[value(alias = "keep")]
    Abort,
    /// At a failed step, keep the VM up and ask on the terminal: retry the step, open a
    /// shell in the VM, continue with the next step, or abort. Other failures abort.
    Ask,
}

impl OnError {
    /// Whether a failed build keeps its partial module's folder.
    pub fn keeps_work(self) -> bool {
        self != OnError::Cleanup
    }
}

/// Options of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The folder modules are written to (and `buildRef` parents read from).
    pub output: PathBuf,
    pub engine: EngineChoice,
    pub on_error: OnError,
    /// Capture `buildRef` children as a layer over the parent's disk.
    pub thin: bool,
    pub cache: Cache,
    /// `Internet::Off` (`--no-internet`): no VPC gets NAT to the host, whatever the manifest
    /// says (hermetic builds, tests).
    pub internet: Internet,
    /// Where a failed or cancelled build's step output and serial logs are moved (see
    /// [`crate::build_logs`]); `None` drops them with the partial module.
    pub failed_logs: Option<PathBuf>,
    /// Replace a module of the same name (`--force`); without it such a build is refused.
    pub replace: bool,
    pub step_cache: StepCache,
}

/// What the build does with the step cache (see [`crate::step_cache`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCache {
    /// Start each VM from the longest chain of its steps' layers in the cache (off with
    /// `--no-cache`).
    pub reuse: bool,
    /// Take a layer after each step that can have one.
    pub layers: bool,
}

impl Default for StepCache {
    fn default() -> Self {
        StepCache {
            reuse: true,
            layers: true,
        }
    }
}

/// Shared state of one build.
pub struct BuildContext {
    pub events: Arc<dyn EventSink>,
    pub cancel: Arc<AtomicBool>,
    pub registry: VmRegistry,
}

/// The runtime folder for sockets, per user and checked (see [`crate::runtime`]).
pub fn runtime_root() -> Result<PathBuf, crate::runtime::RuntimeDirError> {
    crate::runtime::root()
}
