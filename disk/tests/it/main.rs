//! kiln-disk's integration tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.

mod bad_images;
mod chain_model;
mod check_and_fat;
mod common;
mod crash;
mod damaged;
mod info_map_resize;
mod qemu_interop;
mod untrusted;
