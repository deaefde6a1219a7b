//! Build-time inputs of the kiln binary:
//! - `KILN_GIT_COMMIT`: the git commit kiln is built from (`kiln --version`, `module.yaml`).
//!   Outside a git checkout (a crate tarball) it is whatever `KILN_GIT_COMMIT` says in the
//!   build's environment, else `unknown`.
//! - `KILN_EMBEDDED_AGENT`: the static guest agent, which `kiln` carries inside itself
//!   (`include_bytes!`) so a copied or installed binary needs no separate agent. It is built
//!   here by a nested cargo into `<target>/agent/kiln-agent` (the place scripts/setup.sh used,
//!   shared by release, test and clippy builds), or taken from `KILN_EMBED_AGENT=<path>`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn git_commit() {
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

/// The target folder of the build running this script: `OUT_DIR` is
/// `<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`.
fn outer_target_dir(out_dir: &Path) -> Option<(PathBuf, String)> {
    let profile_dir = out_dir.ancestors().nth(3)?;
    let profile = profile_dir.file_name()?.to_str()?.to_string();
    let mut target = profile_dir.parent()?;
    if std::env::var("TARGET").ok().as_deref() == target.file_name().and_then(|n| n.to_str()) {
        target = target.parent()?;
    }
    Some((target.to_path_buf(), profile))
}

/// Builds the static agent as scripts/setup.sh did; returns its path.
fn build_agent(workspace: &Path, out_dir: &Path) -> PathBuf {
    let (target, profile) = outer_target_dir(out_dir)
        .unwrap_or_else(|| panic!("cannot find the target folder above OUT_DIR {out_dir:?}"));
    // An outer build with the agent profile holds `<target>/agent`'s lock: use another folder.
    let target = if profile == "agent" {
        target.join("agent-embed")
    } else {
        target
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "rustc",
            "--locked",
            "-p",
            "kiln-agent",
            "--bin",
            "kiln-agent",
        ])
        .args(["--profile", "agent", "--target-dir"])
        .arg(&target)
        .args(["--", "-C", "target-feature=+crt-static"]);
    // The outer build's flags, wrappers (clippy-driver) and profile overrides are not the
    // agent's: the same agent bytes whatever command builds kiln, so bootstrap and step cache
    // keys (which hold the agent's digest) stay the same. The jobserver (CARGO_MAKEFLAGS) stays.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_TARGET_")
            || k.starts_with("CARGO_ENCODED_")
            || k.starts_with("__CARGO")
            || k.starts_with("RUSTC_")
            || matches!(k, "RUSTFLAGS" | "RUSTDOCFLAGS" | "CARGO_INCREMENTAL")
        {
            cmd.env_remove(k);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build the guest agent: {e}"));
    if !status.success() {
        panic!(
            "building the static guest agent failed ({status}); the command is `cargo rustc -p \
             kiln-agent --bin kiln-agent --profile agent -- -C target-feature=+crt-static`. \
             KILN_EMBED_AGENT=<path> embeds a prebuilt one instead"
        );
    }
    target.join("agent/kiln-agent")
}

fn embedded_agent() {
    println!("cargo:rerun-if-env-changed=KILN_EMBED_AGENT");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo"));
    let workspace = manifest_dir.parent().expect("builder/ is in the workspace");
    let agent = match std::env::var_os("KILN_EMBED_AGENT").filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            println!("cargo:rerun-if-changed={}", p.display());
            p
        }
        None => {
            // An agent change (its code, dependencies or profile) embeds a new agent.
            for p in ["agent/src", "agent/Cargo.toml", "Cargo.toml", "Cargo.lock"] {
                println!("cargo:rerun-if-changed={}", workspace.join(p).display());
            }
            build_agent(workspace, &out_dir)
        }
    };
    // A copy in OUT_DIR: what include_bytes! reads does not change under a later build.
    let embedded = out_dir.join("kiln-agent");
    std::fs::copy(&agent, &embedded)
        .unwrap_or_else(|e| panic!("copying the guest agent {agent:?} to {embedded:?}: {e}"));
    println!("cargo:rustc-env=KILN_EMBEDDED_AGENT={}", embedded.display());
}

fn main() {
    git_commit();
    embedded_agent();
}
