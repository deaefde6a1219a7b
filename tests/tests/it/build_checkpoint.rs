//! What a step cache checkpoint costs: the guest's file systems frozen by the agent's own
//! `freeze` request (no process started in the guest), the overlay swapped, the thaw. A
//! benchmark-style print of each checkpoint's `durationMs` and `frozenMs`, not a timed
//! assertion.

use std::process::Command;

use super::build_common::{boot_prereqs_or_skip, bootstrap_vm, repo_root};

/// Three steps (shell, file, shell), each taking a layer.
fn manifest() -> String {
    let steps = r#"      - name: one
        type: shell
        shell:
          inline: echo one > /srv/one
      - name: put
        type: file
        file:
          fileRef: f
          destination: /srv/f
      - name: two
        type: shell
        shell:
          inline: cat /srv/f > /srv/two
"#;
    format!(
        "{}files:\n  - name: f\n    inline: \"content 1\\n\"\n",
        bootstrap_vm("box", steps)
    )
}

#[test]
fn checkpoints_freeze_through_the_agent() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest();
    let manifest = tmp.path().join("checkpoint.yaml");
    std::fs::write(&manifest, text).unwrap();
    let modules = tmp.path().join("modules");
    // --no-cache: every step runs (and checkpoints) even when an earlier run left its layers.
    let out = Command::new(&kiln)
        .args(["build", manifest.to_str().unwrap(), "--output"])
        .arg(&modules)
        .args(["--json", "--no-cache"])
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .output()
        .expect("running kiln");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- stdout\n{stdout}--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kiln build failed");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let unfrozen: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "note")
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("without freezing"))
        .collect();
    assert!(unfrozen.is_empty(), "not frozen: {unfrozen:?}");
    let checkpoints: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "checkpoint")
        .collect();
    assert_eq!(
        checkpoints.len(),
        3,
        "one checkpoint per step: {checkpoints:?}"
    );
    println!("checkpoint cost under this machine's engine (the agent's freeze request):");
    for c in &checkpoints {
        let total = c["durationMs"].as_u64().expect("durationMs");
        let frozen = c["frozenMs"].as_u64().expect("frozenMs");
        println!(
            "  after step {}: {total} ms in all, {frozen} ms of it frozen, {} bytes, freeze+thaw {} ms",
            c["index"].as_u64().unwrap_or(0) + 1,
            c["bytes"],
            total.saturating_sub(frozen)
        );
    }
}
