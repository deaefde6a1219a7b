//! The `kiln` binary is self-contained: copied alone into an empty folder and run from there
//! with no `KILN_AGENT_BIN`, it builds `examples/hello.yaml` with the guest agent it carries,
//! written out to the cache under its digest.
//!
//! The build uses the shared test cache, not a fresh one: the embedded agent is the same bytes
//! as the one the other tests use, so the bootstrapped base is reused instead of made again.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::build_common::*;

#[test]
fn a_copied_kiln_builds_hello_with_its_embedded_agent() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let alone = tmp.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    let copied = alone.join("kiln");
    std::fs::copy(&kiln, &copied).unwrap();
    std::fs::copy(
        repo_root().join("examples/hello.yaml"),
        alone.join("hello.yaml"),
    )
    .unwrap();
    let cache = kiln_e2e::cache_dir();

    let out = Command::new(&copied)
        .args(["build", "hello.yaml", "--output", "modules", "--no-cache"])
        .env_remove("KILN_AGENT_BIN")
        .env("KILN_CACHE", &cache)
        .env("KILN_NO_INTERNET", "true")
        .current_dir(&alone)
        .output()
        .expect("running the copied kiln");
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the copied kiln failed to build hello"
    );

    // The module names the agent its base carries; that agent is in the cache by digest.
    let yaml = std::fs::read_to_string(alone.join("modules/hello/module.yaml")).unwrap();
    let digest = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("agentSha256:"))
        .map(|d| d.trim().trim_matches(['"', '\'']).to_string())
        .unwrap_or_else(|| panic!("no agentSha256 in module.yaml:\n{yaml}"));
    let agent = cache.join("agent").join(&digest).join("kiln-agent");
    let bytes = std::fs::read(&agent)
        .unwrap_or_else(|e| panic!("the embedded agent is not at {}: {e}", agent.display()));
    assert_eq!(hex::encode(Sha256::digest(&bytes)), digest);
    assert!(
        kiln_agent_is_static(&agent),
        "{} is not static",
        agent.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{}", agent.display());

    // It is the agent kiln's build made (builder/build.rs, `<target>/agent/kiln-agent`).
    let built = kiln
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("agent/kiln-agent"));
    match built.filter(|b| b.is_file()) {
        Some(b) => assert_eq!(std::fs::read(&b).unwrap(), bytes, "{}", b.display()),
        None => eprintln!("note: no <target>/agent/kiln-agent to compare with (KILN_EMBED_AGENT)"),
    }
}

/// An ELF with no program interpreter: what runs in any guest whatever its libc.
fn kiln_agent_is_static(p: &Path) -> bool {
    let out = Command::new("file").arg("-L").arg(p).output();
    match out {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            // "statically linked" or "static-pie linked"; never "interpreter /lib64/...".
            s.contains("ELF") && s.contains("static") && !s.contains("interpreter")
        }
        // Without `file`: at least an ELF.
        _ => std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF")),
    }
}
