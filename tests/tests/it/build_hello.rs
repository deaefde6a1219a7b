//! `kiln build examples/hello.yaml` end to end on whatever engine the host offers (QEMU TCG
//! on this project's machines), then the captured disk inspected from outside the guest.

use crate::build_common::*;
use kiln_e2e::module::{clone_run_exec, CloneExec};

#[test]
fn hello_builds_and_its_disk_has_every_step() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
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
    // Which kiln built it: `kiln --version`'s release and commit.
    let version = run_kiln(&kiln, &["--version"]);
    let version = String::from_utf8_lossy(&version.stdout);
    let commit = version
        .trim()
        .strip_suffix(')')
        .and_then(|v| v.split_once("(commit "))
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("kiln --version: {version}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version}"
    );
    if commit != "unknown" {
        // Quoted or not, as the YAML writer sees fit (all digits would be a number).
        assert!(
            yaml.lines()
                .any(|l| l.starts_with("kilnCommit:") && l.contains(commit)),
            "{yaml}"
        );
    }
    assert!(
        hidden_entries(&modules).is_empty(),
        "leftovers: {:?}",
        hidden_entries(&modules)
    );

    // The steps did not wait for the guest's DHCP client: kiln handed the lease over (after
    // the first boot and again after the reboot step). The agent may rightly decline one when
    // the guest's own networkd got to the NIC first (a very slow guest), so at least one.
    let events = std::fs::read_to_string(module.join("logs/events.jsonl")).unwrap();
    let handovers = events.matches("handed to the guest").count();
    assert!(
        (1..=2).contains(&handovers),
        "{handovers} network handovers in {events}"
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
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "hello",
            modules: &modules,
            clones: &clones,
            count: Some(2),
            vm: "hello",
            run_dir: &tmp.path().join("run"),
            env: &[],
        },
        &["cat", "/etc/kiln-hello"],
    )
    .unwrap();
    assert!(clones.join("hello-1/clone.yaml").is_file());
    assert!(clones.join("hello-2/clone.yaml").is_file());
    assert!(exec.status.success());
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "hello from hello"
    );
    // The clone wrote to its own overlay; the module's disk is unchanged.
    qemu_img_check(&disk).unwrap();
}
