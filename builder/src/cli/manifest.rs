//! `kiln validate`, `kiln fmt`, `kiln plan`, `kiln schema`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Manifest files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FmtArgs {
    pub file: PathBuf,
    /// Exit 1 if the file is not already canonical; change nothing.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {}

pub fn validate(_a: ValidateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln validate` is not implemented yet")
}

pub fn fmt(_a: FmtArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln fmt` is not implemented yet")
}

pub fn plan(_a: PlanArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln plan` is not implemented yet")
}

pub fn schema(_a: SchemaArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln schema` is not implemented yet")
}
