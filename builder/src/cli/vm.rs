//! `kiln vm run` and `kiln doctor`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot one VM from a kernel by hand.
    Run {
        #[arg(long)]
        kernel: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn run(_c: VmCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln vm` is not implemented yet")
}

pub fn doctor(_a: DoctorArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln doctor` is not implemented yet")
}
