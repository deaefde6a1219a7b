//! `kiln build` and the commands that use built modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The module manifest.
    pub file: PathBuf,
}

pub fn build(_a: BuildArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln build` is not implemented yet")
}
