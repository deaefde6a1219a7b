//! kiln-builder: from a manifest to a captured module, and the `kiln` command line.

pub mod bootimage;
pub mod build;
pub mod build_logs;
pub mod cache;
pub mod cli;
pub mod clone;
pub mod diskops;
pub mod engine;
pub mod events;
pub mod guest;
pub mod http_directory;
pub mod job;
pub mod launch;
pub mod leftovers;
pub mod log_file;
pub mod mac;
pub mod manifest;
pub mod module;
pub mod network;
pub mod path_io;
pub mod plan_adapter;
pub mod provision;
pub mod run_lock;
pub mod runtime;
pub mod serve;
pub mod sources;
