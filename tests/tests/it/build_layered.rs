//! `examples/layered.yaml` (a `buildRef` child of `hello`) end to end: build a `hello` parent
//! into this test's own modules folder, build the child on the parent's captured disk, check
//! the child's disk holds both layers' effects, then clone the child, boot the clone on its
//! own network and reach it with `kiln exec`.
//!
//! The parent is `examples/hello.yaml` without its reboot and check steps: the same VM name,
//! base (so the same cached bootstrap), files and effects, minus the slowest part under TCG
//! (build_hello covers the reboot). Everything runs with `--no-internet`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::build_common::*;

/// examples/hello.yaml, cut before its `restart` step.
fn quick_hello() -> String {
    let full = std::fs::read_to_string(repo_root().join("examples/hello.yaml")).unwrap();
    let cut = full
        .find("      - name: restart")
        .expect("examples/hello.yaml has a `restart` step");
    let files = full
        .find("files:")
        .expect("examples/hello.yaml has `files`");
    assert!(cut < files);
    format!("{}{}", &full[..cut], &full[files..])
}

#[test]
fn layered_child_has_both_layers_and_its_clone_boots() {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(reason) => {
            kiln_e2e::skip(reason);
            return;
        }
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    let parent = tmp.path().join("hello.yaml");
    std::fs::write(&parent, quick_hello()).unwrap();

    let out = run_kiln(
        &kiln,
        &[
            "build",
            parent.to_str().unwrap(),
            "--output",
            m,
            "--no-internet",
        ],
    );
    assert!(out.status.success(), "building the parent failed");
    let parent_took = started.elapsed();

    let out = run_kiln(
        &kiln,
        &[
            "build",
            "examples/layered.yaml",
            "--output",
            m,
            "--no-internet",
        ],
    );
    assert!(out.status.success(), "building the child failed");
    let module = modules.join("layered");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    assert!(
        yaml.contains("hello"),
        "the record names its parent: {yaml}"
    );
    assert!(
        hidden_entries(&modules).is_empty(),
        "leftovers: {:?}",
        hidden_entries(&modules)
    );

    // Both layers on the child's (flattened) disk, read from outside the guest.
    let disk = module.join("disks/layered-root.qcow2");
    qemu_img_check(&disk).unwrap();
    let work = tmp.path();
    assert_eq!(
        read_guest_file(&disk, work, "/etc/kiln-hello")
            .unwrap()
            .trim(),
        "hello from hello",
        "the parent's step"
    );
    assert_eq!(
        read_guest_file(&disk, work, "/etc/motd").unwrap(),
        "This image was built by kiln.\n",
        "the parent's file"
    );
    assert_eq!(
        read_guest_file(&disk, work, "/etc/kiln-layered").unwrap(),
        "layered on hello\n",
        "the child's step"
    );
    // The parent's module is untouched by its child's build.
    qemu_img_check(&modules.join("hello/disks/hello-root.qcow2")).unwrap();

    // A clone of the child boots on its own network and answers `kiln exec`.
    let clones = tmp.path().join("clones");
    let c = clones.to_str().unwrap();
    let out = run_kiln(&kiln, &["clone", "layered", "--modules", m, "--clones", c]);
    assert!(out.status.success());
    let run_dir = tmp.path().join("run");
    let mut run = Command::new(&kiln)
        .args(["run", "layered-1", "--clones", c])
        .env("KILN_RUN_DIR", &run_dir)
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .spawn()
        .unwrap();
    let sock = run_dir.join("clones/layered-1/layered/vsock.sock");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", "layered-1/layered", "--"];
        a.extend_from_slice(args);
        Command::new(&kiln)
            .args(&a)
            .env("KILN_RUN_DIR", &run_dir)
            .output()
            .unwrap()
    };
    let layers = exec(&["cat", "/etc/kiln-hello", "/etc/kiln-layered"]);
    // The clone's NIC got a DHCP lease from its own network: a default route through the
    // default subnet's gateway 10.0.2.1 (0102000A in /proc/net/route).
    let route = exec(&[
        "sh",
        "-c",
        "for i in $(seq 1 60); do \
           awk '$2==\"00000000\" && $3==\"0102000A\" {f=1} END {exit !f}' /proc/net/route && exit 0; \
           sleep 1; \
         done; cat /proc/net/route; exit 1",
    ]);
    let _ = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status();
    let _ = run.wait();
    eprintln!(
        "exec stderr: {}{}\nroute: {}",
        String::from_utf8_lossy(&layers.stderr),
        String::from_utf8_lossy(&route.stderr),
        String::from_utf8_lossy(&route.stdout)
    );
    assert!(layers.status.success());
    assert_eq!(
        String::from_utf8_lossy(&layers.stdout),
        "hello from hello\nlayered on hello\n"
    );
    assert!(
        route.status.success(),
        "the clone has no lease on its network"
    );
    qemu_img_check(&disk).unwrap();
    eprintln!(
        "build_layered took {:.0} s (parent {:.0} s)",
        started.elapsed().as_secs_f64(),
        parent_took.as_secs_f64()
    );
}
