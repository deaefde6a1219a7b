//! `kiln build examples/hello.yaml` end to end on whatever engine the host offers (QEMU TCG
//! on this project's machines), then the captured disk inspected from outside the guest.

mod build_common;

use build_common::*;

#[test]
fn hello_builds_and_its_disk_has_every_step() {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    let out = run_kiln(&kiln, &["build", "examples/hello.yaml", "--output", m]);
    assert!(out.status.success(), "kiln build failed");

    let module = modules.join("hello");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    assert!(yaml.contains("name: hello"), "{yaml}");
    assert!(
        yaml.contains("engine: qemu") || yaml.contains("engine: kvm"),
        "{yaml}"
    );
    assert!(yaml.contains("packageVersions"), "{yaml}");
    assert!(
        hidden_entries(&modules).is_empty(),
        "leftovers: {:?}",
        hidden_entries(&modules)
    );

    let disk = module.join("disks/hello-root.qcow2");
    qemu_img_check(&disk).unwrap();
    let work = tmp.path();
    let hello = read_guest_file(&disk, work, "/etc/kiln-hello").unwrap();
    assert_eq!(hello.trim(), "hello from hello");
    let motd = read_guest_file(&disk, work, "/etc/motd").unwrap();
    assert_eq!(motd, "This image was built by kiln.\n");
    // Template cleanup ran before power-off: no machine identity in the image.
    let mid = read_guest_file(&disk, work, "/etc/machine-id").unwrap();
    assert_eq!(mid, "", "machine-id must be empty in a template");

    let ls = run_kiln(&kiln, &["ls", "--modules", m]);
    assert!(ls.status.success());
    assert!(String::from_utf8_lossy(&ls.stdout).contains("hello"));

    // The module clones, a clone boots and answers `kiln exec`.
    let clones = tmp.path().join("clones");
    let c = clones.to_str().unwrap();
    let out = run_kiln(
        &kiln,
        &[
            "clone",
            "hello",
            "--count",
            "2",
            "--modules",
            m,
            "--clones",
            c,
        ],
    );
    assert!(out.status.success());
    assert!(clones.join("hello-1/clone.yaml").is_file());
    assert!(clones.join("hello-2/clone.yaml").is_file());
    let run_dir = tmp.path().join("run");
    let mut run = std::process::Command::new(&kiln)
        .args(["run", "hello-1", "--clones", c])
        .env("KILN_RUN_DIR", &run_dir)
        .env("KILN_NO_INTERNET", "true")
        .current_dir(repo_root())
        .spawn()
        .unwrap();
    // `kiln run` binds the VM's sockets before QEMU starts; wait for them.
    let sock = run_dir.join("clones/hello-1/hello/vsock.sock");
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let exec = std::process::Command::new(&kiln)
        .args(["exec", "hello-1/hello", "--", "cat", "/etc/kiln-hello"])
        .env("KILN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status();
    let _ = run.wait();
    eprintln!("exec stderr: {}", String::from_utf8_lossy(&exec.stderr));
    assert!(exec.status.success());
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "hello from hello"
    );
    // The clone wrote to its own overlay; the module's disk is unchanged.
    qemu_img_check(&disk).unwrap();
}
