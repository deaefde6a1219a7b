//! `kiln rm`: remove modules, or clones with `--clone`. Each folder goes at once (renamed to
//! a hidden name, then deleted).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use crate::clone;
use crate::module;

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Module names in --modules (clone names in --clones with --clone).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Remove clones instead of modules.
    #[arg(long)]
    pub clone: bool,
    /// Remove a module even while clones or thin modules use it. Clones that hold links to
    /// its files keep working; thin modules over it, and clones without links, stop working.
    #[arg(long)]
    pub force: bool,
    #[arg(long, env = "KILN_MODULES", default_value = "modules")]
    pub modules: PathBuf,
    #[arg(long, env = "KILN_CLONES", default_value = "clones")]
    pub clones: PathBuf,
}

pub fn rm(a: RmArgs) -> anyhow::Result<ExitCode> {
    for name in &a.names {
        // A name, never a path: nothing outside the folders is removed.
        module::check_name(name)?;
        if a.clone {
            rm_clone(&a, name)?;
        } else {
            rm_module(&a, name)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rm_module(a: &RmArgs, name: &str) -> anyhow::Result<()> {
    let dir = a.modules.join(name);
    if !dir.join(module::MODULE_FILE).is_file() {
        let hint = if a.clones.join(name).join(clone::CLONE_FILE).is_file() {
            " (a clone has that name: kiln rm --clone)"
        } else {
            ""
        };
        bail!("no module `{name}` in {}{hint}", a.modules.display());
    }
    let users = clone::users(&a.clones, &dir)?;
    let children = module::thin_children(&a.modules, name)?;
    if !users.is_empty() || !children.is_empty() {
        let mut what = Vec::new();
        if !users.is_empty() {
            what.push(format!("clones {}", users.join(", ")));
        }
        if !children.is_empty() {
            what.push(format!("thin modules {}", children.join(", ")));
        }
        if !a.force {
            bail!(
                "module `{name}` is in use by {}; remove those first, or pass --force",
                what.join(" and ")
            );
        }
        // Clones without their own links read the module's files: they break with it.
        for (_, c) in clone::list(&a.clones)? {
            if users.contains(&c.name) && c.snapshot.is_none() {
                eprintln!(
                    "warning: clone `{}` reads the module's own files and will not run any more",
                    c.name
                );
            }
        }
        for child in &children {
            eprintln!("warning: thin module `{child}` is a layer over `{name}` and will not clone or run any more");
        }
    }
    module::remove_folder(&dir).with_context(|| format!("removing module `{name}`"))?;
    eprintln!("removed module `{name}` ({})", dir.display());
    Ok(())
}

fn rm_clone(a: &RmArgs, name: &str) -> anyhow::Result<()> {
    let dir = a.clones.join(name);
    if !dir.join(clone::CLONE_FILE).is_file() {
        bail!("no clone `{name}` in {}", a.clones.display());
    }
    // A running clone's VMs write its overlays: never removed under them. Holding the run
    // lock while removing also keeps a `kiln run` from starting meanwhile.
    let _lock = crate::run_lock::acquire(&dir, name)?;
    module::remove_folder(&dir).with_context(|| format!("removing clone `{name}`"))?;
    eprintln!("removed clone `{name}` ({})", dir.display());
    Ok(())
}
