//! The `kiln` command line: argument parsing and dispatch. Each group of subcommands lives in
//! its own module; the library modules do the work, this layer adds context to errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build;
mod cache;
mod completions;
mod console;
mod disk;
mod doctor;
mod instance;
mod logs;
mod man;
mod manifest;
pub mod modules;
mod report;
mod rm;
mod serve;
mod vm;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version = crate::version::LONG,
    about = "Build VM image modules from a YAML manifest"
)]
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
    /// Continue a build paused at a handbuild step.
    Resume(build::ResumeArgs),
    /// How to attach to a running build VM's screen (VNC), or forward a loopback port to it.
    Console(console::ConsoleArgs),
    /// Show a build's logs (a failed build's too), or list them.
    Logs(logs::LogsArgs),
    /// List built modules and clones.
    Ls(modules::LsArgs),
    /// Make copy-on-write instances of a module.
    Clone(modules::CloneArgs),
    /// Remove modules (refused while clones use them, unless --force), or clones (--clone).
    Rm(rm::RmArgs),
    /// The download and bootstrap cache: list it, prune it.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Boot a clone's VMs (in the foreground; Ctrl-C stops them).
    Run(instance::RunArgs),
    /// Run a command in a running VM (a clone's, or a running or paused build's) through its
    /// agent.
    Exec(instance::ExecArgs),
    /// An interactive shell in a running VM (a clone's, or a running or paused build's)
    /// through its agent.
    Shell(instance::ShellArgs),
    /// Inspect and convert disk images.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Run a virtual machine by hand.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Can I build here? KVM, QEMU, the agent, tools, root, firmware, the cache: each finding
    /// with its fix; exits 1 when no build can run.
    Doctor(doctor::DoctorArgs),
    /// The local web editor: a form and YAML view of a folder of manifests.
    Serve(serve::ServeArgs),
    /// Print the shell completion script for kiln (bash, zsh, fish, ...).
    Completions(completions::CompletionsArgs),
    /// Write kiln's man pages (one per command) into a folder.
    Man(man::ManArgs),
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
        Command::Resume(a) => build::resume(a),
        Command::Console(a) => console::console(a),
        Command::Logs(a) => logs::logs(a),
        Command::Ls(a) => modules::ls(a),
        Command::Clone(a) => modules::clone(a),
        Command::Rm(a) => rm::rm(a),
        Command::Cache(c) => cache::run(c),
        Command::Run(a) => instance::run(a),
        Command::Exec(a) => instance::exec(a),
        Command::Shell(a) => instance::shell(a),
        Command::Disk(c) => disk::run(c),
        Command::Vm(c) => vm::run(c),
        Command::Doctor(a) => doctor::run(a),
        Command::Serve(a) => serve::serve(a),
        Command::Completions(a) => completions::completions(a),
        Command::Man(a) => man::man(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report::render(&e));
            ExitCode::FAILURE
        }
    }
}

/// Logging for the VMM child process (`kiln __vmm`, see `main.rs`), set up once its vCPUs
/// run; `RUST_LOG` applies as everywhere.
pub fn init_vmm_logging() {
    init_logging(0);
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        // A guest powering off closes its vhost-user connections: expected, not a warning.
        0 => "warn,kiln_vmm::vhost_user=error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(crate::events::colour_on(std::io::stderr().is_terminal()))
        .init();
}
