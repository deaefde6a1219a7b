//! kiln-net's integration tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.

mod common;
mod frames;
mod netns;
