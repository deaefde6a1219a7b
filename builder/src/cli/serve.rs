//! `kiln serve`: the local web editor for a folder of manifests.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::serve::{BuildConfig, Config, Serve};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The folder of manifests to edit.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Address to listen on. Loopback by default; another address serves other hosts.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Folder that builds started from the page write modules to (as `kiln build --output`).
    #[arg(long, short = 'o', env = "KILN_MODULES", default_value = "modules")]
    pub output: PathBuf,
    /// Folder of the clones the page makes and runs (as `kiln clone --clones`); default:
    /// `clones` next to the --output folder.
    #[arg(long, env = "KILN_CLONES")]
    pub clones: Option<PathBuf>,
    /// Builds started from the page run every step, none from the step cache (as
    /// `kiln build --no-cache`).
    #[arg(long)]
    pub no_cache: bool,
}

pub fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let program = std::env::current_exe().context("finding the kiln binary to run builds")?;
    // Builds run in a child with another working folder in mind: make the output absolute.
    let output = std::path::absolute(&a.output)
        .with_context(|| format!("resolving {}", a.output.display()))?;
    // Next to the modules: with the default output that is `clones` here, where `kiln clone`
    // puts them too.
    let clones = match &a.clones {
        Some(c) => std::path::absolute(c).with_context(|| format!("resolving {}", c.display()))?,
        None => output
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .join("clones"),
    };
    let s = Serve::bind(Config {
        dir: a.dir.clone(),
        listen: a.listen,
        clones,
        build: BuildConfig {
            program,
            output,
            run_root: crate::build::runtime_root()?,
            no_cache: a.no_cache,
        },
    })
    .with_context(|| format!("cannot serve {}", a.dir.display()))?;
    if !a.listen.ip().is_loopback() {
        eprintln!(
            "warning: listening on {}: other hosts can reach this editor (the token still guards it)",
            a.listen
        );
    }
    // One line on stdout, flushed, so scripts and tests can read the URL.
    let mut out = std::io::stdout();
    writeln!(out, "kiln serve: {}", s.url())?;
    out.flush()?;
    s.run();
    Ok(ExitCode::SUCCESS)
}
