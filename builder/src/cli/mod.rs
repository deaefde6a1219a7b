//! The `kiln` command line: argument parsing and dispatch. Each group of subcommands lives in
//! its own module; the library modules do the work, this layer adds context to errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build;
mod disk;
mod manifest;
mod vm;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Build VM image modules from a YAML manifest")]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check manifests and report every problem at once.
    Validate(manifest::ValidateArgs),
    /// Rewrite a manifest in canonical form.
    Fmt(manifest::FmtArgs),
    /// Show the effective build plan of a manifest.
    Plan(manifest::PlanArgs),
    /// Print the manifest's JSON Schema (for editor completion).
    Schema(manifest::SchemaArgs),
    /// Build a module from a manifest.
    Build(build::BuildArgs),
    /// Inspect and convert disk images.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Run a virtual machine by hand.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Probe this host: KVM, its vendor, and the engine `auto` would pick.
    Doctor(vm::DoctorArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Validate(a) => manifest::validate(a),
        Command::Fmt(a) => manifest::fmt(a),
        Command::Plan(a) => manifest::plan(a),
        Command::Schema(a) => manifest::schema(a),
        Command::Build(a) => build::build(a),
        Command::Disk(c) => disk::run(c),
        Command::Vm(c) => vm::run(c),
        Command::Doctor(a) => vm::doctor(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
