//! `kiln disk ...`: the block layer's operations from the command line.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Show format, sizes and backing chain of an image.
    Info { file: std::path::PathBuf },
}

pub fn run(_c: DiskCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln disk` is not implemented yet")
}
