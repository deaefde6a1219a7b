//! kiln-e2e's end-to-end tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.
//! `build_common` holds the helpers the `kiln build` tests share.

mod build_boot_command;
mod build_checkpoint;
mod build_common;
mod build_copied_binary;
mod build_disk_bus;
mod build_failures;
mod build_fast_boot;
mod build_firmware;
mod build_hello;
mod build_http;
mod build_interrupt;
mod build_iso;
mod build_layered;
mod build_legacy_devices;
mod build_logs;
mod build_on_error;
mod build_pair;
mod build_rebuild;
mod build_secure_boot;
mod build_static_net;
mod build_thin;
mod build_untrusted;
mod build_url;
mod clone_firmware;
mod console;
mod doctor;
mod firmware_common;
mod firmware_images;
mod iso_install;
mod module_boots_in_plain_qemu;
mod modules_cli;
mod run_lock;
mod runtime_dir;
mod shell_terminal;
mod step_cache;
