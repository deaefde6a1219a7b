//! Rebuilding a module that has a live clone (issue 17): without `--force` the rebuild is
//! refused before any work; with it, the clone made from v1 still boots and reads v1's file
//! (its overlay sits on its own hard link of v1's disk), a new clone reads v2's, and
//! `kiln rm` of the module refuses while clones use it, naming them.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::build_common::*;

fn manifest(mark: &str) -> String {
    format!(
        r#"vms:
  - name: box
    source:
      bootstrap: {{ distro: debian, suite: bookworm, packages: [] }}
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: mark
        type: shell
        shell:
          inline: echo "{mark}" > /etc/kiln-mark
"#
    )
}

/// `kiln run <clone>`, then `kiln exec <clone>/box -- cat /etc/kiln-mark`. `Err` when the run
/// ends before its VM's socket exists (its stderr says why).
fn run_and_read_mark(
    kiln: &Path,
    clones: &Path,
    clone: &str,
    run_dir: &Path,
) -> Result<Output, String> {
    let mut child = Command::new(kiln)
        .arg("run")
        .arg(clone)
        .arg("--clones")
        .arg(clones)
        .env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", run_dir)
        .current_dir(repo_root())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sock = run_dir.join(format!("clones/{clone}/box/vsock.sock"));
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Err(format!("kiln run {clone} ended ({st}): {err}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = kiln_e2e::module::Run(child);
    let out = Command::new(kiln)
        .args([
            "exec",
            "--wait-secs",
            "240",
            &format!("{clone}/box"),
            "--",
            "cat",
            "/etc/kiln-mark",
        ])
        .env("KILN_RUN_DIR", run_dir)
        .output()
        .unwrap();
    drop(run);
    eprintln!(
        "$ kiln exec {clone}/box -- cat /etc/kiln-mark\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

#[test]
fn forced_rebuild_keeps_a_live_clone_on_v1() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let clones = tmp.path().join("clones");
    let run_dir = tmp.path().join("run");
    let (m, c) = (modules.to_str().unwrap(), clones.to_str().unwrap());
    let file = tmp.path().join("marked.yaml");
    let f = file.to_str().unwrap();

    std::fs::write(&file, manifest("v1")).unwrap();
    let out = run_kiln(&kiln, &["build", f, "--output", m]);
    assert!(out.status.success(), "v1 build failed");
    let out = run_kiln(
        &kiln,
        &[
            "clone",
            "marked",
            "--name",
            "old",
            "--modules",
            m,
            "--clones",
            c,
        ],
    );
    assert!(out.status.success(), "clone failed");

    // Without --force: refused at once, naming the folder and the flag; v1 stays.
    std::fs::write(&file, manifest("v2")).unwrap();
    let t = Instant::now();
    let out = run_kiln(&kiln, &["build", f, "--output", m]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force"), "{err}");
    assert!(
        err.contains(&modules.join("marked").display().to_string()),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "refused only after work"
    );
    assert_no_partial_module(&modules);

    let out = run_kiln(&kiln, &["build", f, "--output", m, "--force"]);
    assert!(out.status.success(), "forced v2 build failed");
    assert_no_partial_module(&modules);

    // The clone made from v1 passes the run's base check and reads v1.
    let old = run_and_read_mark(&kiln, &clones, "old-1", &run_dir).unwrap();
    assert!(old.status.success());
    assert_eq!(String::from_utf8_lossy(&old.stdout), "v1\n");

    // A new clone reads v2.
    let out = run_kiln(
        &kiln,
        &[
            "clone",
            "marked",
            "--name",
            "new",
            "--modules",
            m,
            "--clones",
            c,
        ],
    );
    assert!(out.status.success(), "clone failed");
    let new = run_and_read_mark(&kiln, &clones, "new-1", &run_dir).unwrap();
    assert!(new.status.success());
    assert_eq!(String::from_utf8_lossy(&new.stdout), "v2\n");

    // The module is in use: `kiln rm` refuses and names its clones.
    let out = run_kiln(&kiln, &["rm", "marked", "--modules", m, "--clones", c]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("old-1") && err.contains("new-1"), "{err}");
    assert!(modules.join("marked/module.yaml").is_file());
}
