//! `kiln rm`, `kiln build` without `--force`, and `kiln cache ls`/`prune` through the `kiln`
//! binary, on a module folder written by hand (no VM): quick, and needs no root.

use std::path::Path;
use std::process::Output;

use crate::build_common::*;

/// A module `name` in `modules` with one small qcow2 disk, as a build leaves it.
fn fake_module(kiln: &Path, modules: &Path, name: &str) {
    let dir = modules.join(name);
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    let disk = dir.join("disks/box-root.qcow2");
    let out = run_kiln(kiln, &["disk", "create", disk.to_str().unwrap(), "4M"]);
    assert!(out.status.success());
    std::fs::write(
        dir.join("module.yaml"),
        format!(
            "apiVersion: kiln/v1\nkind: Module\nname: {name}\nkilnVersion: '0'\nengine: qemu\n\
             builtAt: 0\nbuildSeconds: 0\nmanifest: ''\nvms:\n  - name: box\n    cpus: 1\n    \
             memoryMib: 256\n    source: null\n    agentInImage: true\n    boot: null\n    \
             disks:\n      - name: root\n        file: disks/box-root.qcow2\n        \
             sha256: {}\n        virtualSize: 4194304\n        fileSize: 0\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn rm_refuses_a_module_with_clones_and_removes_whole() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let clones = tmp.path().join("clones");
    let (m, c) = (modules.to_str().unwrap(), clones.to_str().unwrap());
    fake_module(&kiln, &modules, "base");

    // A build of an existing module is refused before anything else happens.
    let manifest = tmp.path().join("base.yaml");
    std::fs::write(
        &manifest,
        "vms:\n  - name: box\n    source:\n      bootstrap: { distro: debian, suite: bookworm }\n    \
         resources: { cpu: 1, memory: 1Gi }\n    disks:\n      - name: root\n        size: 4Gi\n",
    )
    .unwrap();
    let out = run_kiln(&kiln, &["build", manifest.to_str().unwrap(), "--output", m]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(hidden_entries(&modules).is_empty());

    let out = run_kiln(
        &kiln,
        &[
            "clone",
            "base",
            "--count",
            "2",
            "--modules",
            m,
            "--clones",
            c,
        ],
    );
    assert!(out.status.success());
    assert!(clones
        .join("base-1/base/base/disks/box-root.qcow2")
        .is_file());

    let out = run_kiln(&kiln, &["rm", "base", "--modules", m, "--clones", c]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("base-1") && err.contains("base-2") && err.contains("--force"),
        "{err}"
    );
    assert!(modules.join("base/module.yaml").is_file());

    // Names only: nothing outside the folders.
    let out = run_kiln(&kiln, &["rm", "--clone", "../modules/base", "--clones", c]);
    assert!(!out.status.success());
    assert!(modules.join("base/module.yaml").is_file());

    let out = run_kiln(&kiln, &["rm", "--clone", "base-1", "--clones", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!clones.join("base-1").exists());
    assert!(hidden_entries(&clones).is_empty());

    // --force: the module goes, the clone holding links to its files keeps them.
    let out = run_kiln(
        &kiln,
        &["rm", "base", "--force", "--modules", m, "--clones", c],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!modules.join("base").exists());
    assert!(hidden_entries(&modules).is_empty());
    let out = run_kiln(
        &kiln,
        &[
            "disk",
            "check",
            clones.join("base-2/disks/box-root.qcow2").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "the clone's chain still opens");
}

#[test]
fn cache_ls_and_prune() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let blob = cache.join("blobs/sha256").join("b".repeat(64));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, vec![7u8; 3 << 20]).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&kiln)
            .args(args)
            .env("KILN_CACHE", &cache)
            .output()
            .unwrap();
        eprintln!(
            "$ kiln {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        out
    };
    let out = run(&["cache", "ls"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blob") && text.contains("bbbbbbbb") && text.contains("3.0 MiB"),
        "{text}"
    );

    let out = run(&["cache", "prune"]);
    assert!(!out.status.success(), "prune needs --older-than or --all");
    let out = run(&["cache", "prune", "--older-than", "1d"]);
    assert!(out.status.success());
    assert!(blob.is_file(), "used just now: kept");
    let out = run(&["cache", "prune", "--all", "--dry-run"]);
    assert!(out.status.success());
    assert!(blob.is_file());
    let out = run(&["cache", "prune", "--all"]);
    assert!(out.status.success());
    assert!(!blob.exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 entries"));
}
