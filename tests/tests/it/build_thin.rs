//! `kiln build --thin`: a `buildRef` child captured as a qcow2 layer over its parent module's
//! disk (relative backing path, parent digest in module.yaml). The parent is a hello-style
//! module on the same cached bootstrap base as `examples/hello.yaml` (without its reboot
//! step, which alone takes minutes under TCG). The thin disk passes `qemu-img check`, reads
//! back with both modules' work (qemu-img follows the relative backing name), clones and
//! runs; once its parent is gone, `kiln clone` says so.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::build_common::*;
use kiln_e2e::module::{clone_run_exec, CloneExec};

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

const PARENT: &str = r#"vms:
  - name: base
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 1, memory: 1Gi }
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: mark
        type: shell
        shell:
          inline: echo "from the parent" > /etc/parent-mark
"#;

const CHILD: &str = r#"vms:
  - name: layer
    source:
      buildRef: { name: parent }
    resources: { cpu: 1, memory: 1Gi }
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: mark
        type: shell
        shell:
          inline: |
            set -eu
            grep -q "from the parent" /etc/parent-mark
            echo "from the child" > /etc/child-mark
            rm /etc/parent-mark
"#;

#[test]
fn thin_child_is_a_layer_over_its_parent_and_clones() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    let parent = write(tmp.path(), "parent.yaml", PARENT);
    let child = write(tmp.path(), "child.yaml", CHILD);
    let out = run_kiln(&kiln, &["build", &parent, "--output", m]);
    assert!(out.status.success(), "parent build failed");
    let t_parent = t0.elapsed();
    let out = run_kiln(&kiln, &["build", &child, "--output", m, "--thin"]);
    assert!(out.status.success(), "thin child build failed");
    let t_child = t0.elapsed() - t_parent;
    eprintln!(
        "parent build {:.0}s, thin child build {:.0}s",
        t_parent.as_secs_f64(),
        t_child.as_secs_f64()
    );
    assert!(
        hidden_entries(&modules).is_empty(),
        "{:?}",
        hidden_entries(&modules)
    );

    let pdisk = modules.join("parent/disks/base-root.qcow2");
    let cdisk = modules.join("child/disks/layer-root.qcow2");
    let pyaml = std::fs::read_to_string(modules.join("parent/module.yaml")).unwrap();
    let cyaml = std::fs::read_to_string(modules.join("child/module.yaml")).unwrap();
    eprintln!(
        "{}",
        cyaml
            .lines()
            .filter(|l| l.contains("backing") || l.contains("sha256"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        cyaml.contains("backing: ../../parent/disks/base-root.qcow2"),
        "{cyaml}"
    );
    assert!(cyaml.contains("backingModule: parent"), "{cyaml}");
    // The digest recorded for the backing is the parent's own disk digest.
    let psha = pyaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256: "))
        .expect("parent disk sha256")
        .trim_matches('"')
        .to_string();
    assert!(cyaml.contains(&format!("backingSha256: {psha}")), "{cyaml}");

    // The layer names its parent relatively and holds only the child's changes.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&cdisk)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"backing-filename\": \"../../parent/disks/base-root.qcow2\""),
        "{info}"
    );
    let psize = std::fs::metadata(&pdisk).unwrap().len();
    let csize = std::fs::metadata(&cdisk).unwrap().len();
    eprintln!("parent disk {psize} bytes, thin child layer {csize} bytes");
    assert!(
        csize * 4 < psize,
        "the layer must be far smaller than a full image"
    );
    qemu_img_check(&cdisk).unwrap();
    qemu_img_check(&pdisk).unwrap();

    // Read through the chain from outside: both builds' work, and the child's delete.
    let work = tmp.path().join("inspect");
    std::fs::create_dir_all(&work).unwrap();
    assert_eq!(
        read_guest_file(&cdisk, &work, "/etc/child-mark").unwrap(),
        "from the child\n"
    );
    assert!(read_guest_file(&cdisk, &work, "/etc/parent-mark")
        .map(|s| s.is_empty())
        .unwrap_or(true));
    let pwork = tmp.path().join("inspect-parent");
    std::fs::create_dir_all(&pwork).unwrap();
    assert_eq!(
        read_guest_file(&pdisk, &pwork, "/etc/parent-mark").unwrap(),
        "from the parent\n",
        "the parent module is untouched"
    );
    std::fs::remove_dir_all(&work).unwrap();
    std::fs::remove_dir_all(&pwork).unwrap();

    // The thin module clones and runs.
    let clones = tmp.path().join("clones");
    let c = clones.to_str().unwrap();
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "child",
            modules: &modules,
            clones: &clones,
            count: None,
            vm: "layer",
            run_dir: &tmp.path().join("run"),
            env: &[],
        },
        &["cat", "/etc/child-mark"],
    )
    .unwrap();
    assert!(exec.status.success());
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "from the child\n");
    qemu_img_check(&cdisk).unwrap();

    // Without its parent the thin module is refused with the reason, not half-cloned.
    std::fs::rename(modules.join("parent"), tmp.path().join("parent-moved")).unwrap();
    let out = run_kiln(&kiln, &["clone", "child", "--modules", m, "--clones", c]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("thin disk is a layer over"), "{err}");
    assert!(!clones.join("child-2").exists());
    eprintln!("whole test: {:.0}s", t0.elapsed().as_secs_f64());
}
