//! Shared helpers of the `kiln build` end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `<target>/<profile>/kiln`, built by the same cargo run as this test (the test binary
/// lives in `<target>/<profile>/deps/`).
pub fn kiln_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let k = profile_dir.join("kiln");
    k.is_file().then_some(k)
}

/// What every boot test needs; `Err` is the SKIP reason.
pub fn boot_prereqs() -> Result<PathBuf, String> {
    let kiln = kiln_bin().ok_or(
        "the kiln binary is not built next to this test (run the workspace tests, or `cargo build -p kiln-builder` with the same profile)",
    )?;
    if !on_path("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 is not installed (scripts/setup.sh installs it)".into());
    }
    if !on_path("mmdebstrap") {
        return Err("mmdebstrap is not installed (scripts/setup.sh installs it)".into());
    }
    if !is_root() {
        return Err("bootstrapping a Debian root needs root".into());
    }
    // The guest agent is embedded in kiln (or KILN_AGENT_BIN names one).
    Ok(kiln)
}

/// The kiln binary for a test that boots a guest; `None` once the `SKIP:` reason is printed.
pub fn boot_prereqs_or_skip() -> Option<PathBuf> {
    match boot_prereqs() {
        Ok(k) => Some(k),
        Err(reason) => {
            kiln_e2e::skip(reason);
            None
        }
    }
}

pub use kiln_e2e::image::ext4_root;
pub use kiln_e2e::{is_root, on_path};

/// Runs kiln with args in the repository root; output captured. `KILN_NO_INTERNET`: no VPC of
/// a test build gets NAT to the host, so no guest frame leaves kiln's user-space network.
pub fn run_kiln(bin: &Path, args: &[&str]) -> Output {
    run_kiln_with(bin, args, &[])
}

/// `kiln build examples/<example>` into `modules`, which must succeed.
pub fn build_example(bin: &Path, example: &str, modules: &Path) -> Output {
    let manifest = format!("examples/{example}");
    let out = run_kiln(
        bin,
        &["build", &manifest, "--output", modules.to_str().unwrap()],
    );
    assert!(out.status.success(), "kiln build {manifest} failed");
    out
}

/// [`run_kiln`] with more environment variables (a test's own runtime folder or cache).
///
/// A `kiln build` gets `--no-cache`: the tests share one kiln cache across runs (its
/// bootstrap bases are slow to make), so without it a test's steps would come from the layers
/// an earlier run of the same test left, and what the test watches them do would not happen.
/// Tests of the step cache itself use [`run_kiln_reusing`].
pub fn run_kiln_with(bin: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut args = args.to_vec();
    if args.first() == Some(&"build") && !args.contains(&"--no-cache") {
        args.push("--no-cache");
    }
    run_kiln_reusing(bin, &args, env)
}

/// [`run_kiln_with`] that leaves a `kiln build` free to reuse the step cache's layers.
pub fn run_kiln_reusing(bin: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let out = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .output()
        .expect("running kiln");
    eprintln!(
        "$ kiln {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kiln build MANIFEST --output MODULES`.
pub fn build_into(kiln: &Path, manifest: &Path, modules: &Path) -> Output {
    run_kiln(
        kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
        ],
    )
}

/// Writes `manifest` to `<dir>/<file>` and builds it into `<dir>/modules`: the output and
/// everything kiln printed (stdout, then stderr).
pub fn build_text(kiln: &Path, dir: &Path, file: &str, manifest: &str) -> (Output, String) {
    let path = dir.join(file);
    std::fs::write(&path, manifest).unwrap();
    let out = build_into(kiln, &path, &dir.join("modules"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, said)
}

/// `qemu-img check` on an image: Ok when clean.
pub fn qemu_img_check(img: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Reads a file out of a qcow2 image's ext4 root from outside the guest: qemu-img to raw,
/// then debugfs on the root ([`ext4_root`]).
pub fn read_guest_file(qcow2: &Path, work: &Path, path: &str) -> Result<String, String> {
    let raw = work.join("inspect.raw");
    if !raw.exists() {
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(qcow2)
            .arg(&raw)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("qemu-img convert failed: {st}"));
        }
    }
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(ext4_root(&raw).map_err(|e| e.to_string())?)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asserts that `modules` holds nothing a failed or interrupted build left half written.
pub fn assert_no_partial_module(modules: &Path) {
    // `.logs` keeps failed builds' logs on purpose.
    let left: Vec<String> = hidden_entries(modules)
        .into_iter()
        .filter(|n| n != ".logs")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Entries of a folder whose names start with a dot (partial modules, temp files).
pub fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// A runtime folder for a test's builds (`KILN_RUN_DIR`): `<parent>/run`, private to its owner
/// as kiln requires.
pub fn private_run_dir(parent: &Path) -> PathBuf {
    let run_dir = parent.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(
        &run_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    run_dir
}

/// Writes `<dir>/<name>.yaml`; returns its path.
pub fn write_manifest(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

/// A manifest of one bootstrapped Debian VM `name` (the base the tests share) with `steps`,
/// YAML list items indented by six spaces.
pub fn bootstrap_vm(name: &str, steps: &str) -> String {
    format!(
        "vms:\n  - name: {name}\n    source:\n      bootstrap: {{ distro: debian, suite: bookworm, packages: [] }}\n    resources: {{ cpu: 1, memory: 1Gi }}\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n{steps}"
    )
}
