//! The step cache: after each provisioning step a VM's disks become a content-addressed layer
//! in kiln's cache ([`checkpoint`]), named by a key over everything that can change the step's
//! result ([`key`]), the disks swapped through [`checkpoint_disk`] wherever they are served; a later build boots each VM from the longest chain of its steps' layers
//! found whole in the cache ([`store`]) and runs only the steps after it. See
//! docs/step-cache.md.

pub mod checkpoint;
pub mod checkpoint_disk;
pub mod key;
pub mod resume;
pub mod store;

pub use checkpoint::{CheckpointError, Checkpointer, Freeze, StepInfo, Taken};
pub use checkpoint_disk::{CheckpointDisk, SwapError, VmmDisk};
pub use key::{vm_keys, KeyError, StepKeys};
pub use resume::{find_resume, Resume};
pub use store::{LayerRecord, LayerStore, StoreError};
