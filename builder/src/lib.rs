//! kiln-builder: from a manifest to a captured module, and the `kiln` command line.

pub mod cli;
