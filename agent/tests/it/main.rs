//! kiln-agent's integration tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.

mod cleanup;
mod common;
mod exec;
mod files;
mod freeze;
mod guest;
mod sessions;
mod static_binary;
mod tty;
