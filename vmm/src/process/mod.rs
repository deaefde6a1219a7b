//! One VMM process per VM. The `kiln` binary re-executes itself in a hidden mode
//! (`kiln __vmm --socket PATH --spec JSON`) that runs exactly one VM ([`child`]); the
//! parent ([`parent::VmProcess`]) controls it over a Unix socket with one JSON object per
//! line ([`protocol`]): start, status, pause, resume, stop. A guest that crashes its VMM
//! takes only that process down, and the parent still learns why from the exit event or,
//! failing that, from the exit status. A second socket takes live checkpoints of the VM's
//! disks for the step cache ([`checkpoint`]).

pub mod checkpoint;
pub mod child;
pub mod parent;
pub mod protocol;

pub use parent::VmProcess;
pub use protocol::{Request, Response, VmSpec};

/// The hidden subcommand name the parent runs the child with.
pub const CHILD_SUBCOMMAND: &str = "__vmm";
