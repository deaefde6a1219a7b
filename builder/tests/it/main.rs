//! kiln-builder's integration tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.

mod bootimage;
mod disk_cli;
mod kvm_engine;
mod manifest_cli;
mod manifest_corpus;
mod manifest_fmt;
mod manifest_plan;
mod manifest_props;
mod qemu_boot_keys;
mod qemu_disk_bus;
mod serve_api;
mod ssh;
mod vm_cli;
