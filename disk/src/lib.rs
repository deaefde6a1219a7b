//! kiln-disk: the block layer under every disk kiln touches.
//!
//! The [`BlockDevice`] trait is the contract the virtio-blk device (kiln-vmm), the capture
//! step and `kiln disk` share. Formats (raw, qcow2) live behind it; [`open`] probes the format
//! and follows backing chains.

mod convert;
mod create;
mod device;
mod error;
mod fat;
mod fuzz;
mod info;
mod live;
pub mod nbd;
mod open;
pub mod qcow2;
mod raw;
#[cfg(any(test, feature = "test-images"))]
pub mod test_images;
mod thin;
mod vectored;
#[cfg(test)]
mod vectored_tests;
mod write_behind;

pub use convert::{convert, Compression, ConvertOptions, ConvertStats, ProgressFn};
pub use create::{create, create_overlay, resize, virtual_size, CreateOptions};
pub use device::{check_range, BlockDevice, BlockError, BlockResult, BlockStatus};
pub use error::{DiskError, Result};
pub use fat::{build_fat, create_cidata, create_fat_image, create_floppy, FatFile, FLOPPY_SIZE};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use info::{info, map, Extent, ExtentKind, ImageInfo, LayerInfo};
pub use live::{Detached, LiveDisk};
pub use open::{
    backing_name, chain, detect_format, open, open_with_own_reader, resolve_backing, BackingPolicy,
    Format, Layer, OpenOptions, MAX_CHAIN_DEPTH,
};
pub use qcow2::check::{check, CheckReport};
pub use raw::RawDevice;
pub use thin::{capture_thin, ThinStats};
