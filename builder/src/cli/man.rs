//! `kiln man DIR`: roff man pages for kiln and each subcommand (`kiln.1`, `kiln-build.1`,
//! `kiln-cache-prune.1`, ...), generated from the clap definition; packages install them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The folder the pages are written to (made if missing).
    pub dir: PathBuf,
}

pub fn man(a: ManArgs) -> anyhow::Result<ExitCode> {
    let n = write_pages(&a.dir)?;
    eprintln!("kiln man: {n} pages in {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes a page for `kiln` and for each subcommand, recursively; returns how many.
pub fn write_pages(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = super::Cli::command().version(crate::version::LONG);
    write_tree(dir, cmd, "kiln")
}

fn write_tree(dir: &Path, cmd: clap::Command, name: &str) -> anyhow::Result<usize> {
    // The page's title is its file's name: `kiln-cache-prune`, as man(1) looks it up.
    let cmd = cmd.name(name.to_string());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("rendering the page of `{name}`"))?;
    let path = dir.join(format!("{name}.1"));
    // Written under a temporary name and renamed: a reader never sees half a page.
    let tmp = dir.join(format!(".{name}.1.tmp"));
    std::fs::write(&tmp, &page).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += write_tree(dir, sub.clone(), &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_kiln_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_pages(dir.path()).unwrap();
        let top = std::fs::read_to_string(dir.path().join("kiln.1")).unwrap();
        assert!(
            top.starts_with(".ie") || top.contains(".TH kiln 1"),
            "{top}"
        );
        assert!(top.contains(crate::version::VERSION), "no version: {top}");
        let build = std::fs::read_to_string(dir.path().join("kiln-build.1")).unwrap();
        assert!(build.contains(".TH kiln-build 1"), "{build}");
        assert!(
            build.contains("output"),
            "the flags of `kiln build`: {build}"
        );
        assert!(dir.path().join("kiln-cache-prune.1").is_file());
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, n, "one file per page, nothing left behind");
    }
}
