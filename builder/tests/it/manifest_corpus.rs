//! Golden-file tests: every `X.yaml` under `tests/manifests/` has an `X.expected` holding the
//! exact output of `kiln validate tests/manifests/X.yaml` run from the crate directory.
//! `KILN_BLESS=1 cargo test -p kiln-builder --test it manifest_corpus` rewrites the golden
//! files; without it the test compares and fails on any difference.

use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(rel: &Path) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("validate")
        .arg(rel)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KILN_MAX_DISK_SIZE")
        .output()
        .expect("run kiln");
    (
        String::from_utf8(out.stdout).expect("utf-8 output"),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn corpus_matches_golden_files() {
    let files = corpus();
    assert!(
        files.len() >= 40,
        "the corpus has only {} manifests",
        files.len()
    );
    let bless = std::env::var_os("KILN_BLESS").is_some();
    let mut failures = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for path in &files {
        let rel = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .expect("inside the crate");
        let (stdout, code) = validate(rel);
        let expected_path = path.with_extension("expected");
        // The exit code must agree with the report: 0 for valid, 1 for invalid.
        let says_valid = stdout
            .lines()
            .last()
            .is_some_and(|l| l.contains(": valid:"));
        assert_eq!(
            code,
            if says_valid { 0 } else { 1 },
            "{}: exit code {code}\n{stdout}",
            rel.display()
        );
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // Files named `valid-*` must validate; `invalid-*` must not.
        if name.starts_with("valid-") {
            assert!(says_valid, "{} should be valid:\n{stdout}", rel.display());
            valid += 1;
        } else {
            assert!(
                !says_valid,
                "{} should be invalid:\n{stdout}",
                rel.display()
            );
            assert!(
                stdout.contains(": error: "),
                "{} has no error lines",
                rel.display()
            );
            invalid += 1;
        }
        if bless {
            std::fs::write(&expected_path, &stdout).expect("write golden file");
            continue;
        }
        match std::fs::read_to_string(&expected_path) {
            Ok(expected) if expected == stdout => {}
            Ok(expected) => failures.push(format!(
                "--- {} expected\n{expected}--- got\n{stdout}",
                expected_path.display()
            )),
            Err(e) => failures.push(format!(
                "{}: {e} (run with KILN_BLESS=1)",
                expected_path.display()
            )),
        }
    }
    assert!(
        valid >= 10 && invalid >= 25,
        "{valid} valid, {invalid} invalid manifests"
    );
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unreadable_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["validate", "tests/manifests/does-not-exist.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cannot read manifest"), "{stdout}");
}

#[test]
fn json_output_lists_diagnostics() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "validate",
            "--json",
            "tests/manifests/invalid-unknown-fields.yaml",
            "tests/manifests/valid-minimal.yaml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["valid"], false);
    assert_eq!(v[1]["valid"], true);
    let d = &v[0]["diagnostics"][0];
    assert_eq!(d["severity"], "error");
    assert!(d["line"].as_u64().unwrap_or(0) > 0 && d["column"].as_u64().unwrap_or(0) > 0);
    assert!(d["hint"].as_str().unwrap_or("").contains("did you mean"));
}
