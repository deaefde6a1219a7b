//! Puts the git commit kiln is built from into `KILN_GIT_COMMIT` (`kiln --version`,
//! `module.yaml`). Outside a git checkout (a crate tarball) it is whatever `KILN_GIT_COMMIT`
//! says in the build's environment, else `unknown`.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_GIT_COMMIT");
    let commit = std::env::var("KILN_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Built again when HEAD moves: HEAD itself (a checkout) and the branch it names (a commit).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--git-common-dir"]).map(PathBuf::from);
            for d in [Some(dir.clone()), common].into_iter().flatten() {
                println!("cargo:rerun-if-changed={}", d.join(&r).display());
                println!("cargo:rerun-if-changed={}", d.join("packed-refs").display());
            }
        }
    }
    println!("cargo:rustc-env=KILN_GIT_COMMIT={commit}");
}
