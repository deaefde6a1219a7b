//! `kiln fmt`, `kiln plan` and `kiln schema` driven like a user would, plus hostile inputs
//! that must fail fast with a clear message.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn kiln(args: &[&str], dir: &Path) -> (String, String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run kiln");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn fmt_rewrites_then_check_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.yaml");
    std::fs::write(
        &file,
        "vms: [{name: a, resources: {memory: 1Gi, cpu: 1}, source: {blank: true}, isos: [{url: 'https://x.example.org/a.iso'}]}]\n",
    )
    .expect("write");
    let (_, _, code) = kiln(&["fmt", "--check", "m.yaml"], dir.path());
    assert_eq!(code, 1, "a non-canonical file fails --check");
    let (_, _, code) = kiln(&["fmt", "m.yaml"], dir.path());
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&file).expect("read");
    assert_eq!(
        text,
        "vms:\n  - name: a\n    source:\n      blank: true\n    resources:\n      cpu: 1\n      memory: 1Gi\n    isos:\n      - url: https://x.example.org/a.iso\n"
    );
    let (_, _, code) = kiln(&["fmt", "--check", "m.yaml"], dir.path());
    assert_eq!(code, 0, "formatted output is canonical");
    // No temporary files are left next to the manifest.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

#[test]
fn fmt_refuses_invalid_manifests() {
    let (_, err, code) = kiln(
        &[
            "fmt",
            "--stdout",
            "tests/manifests/invalid-unknown-fields.yaml",
        ],
        crate_dir(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("did you mean `provisioners`?"), "{err}");
}

#[test]
fn plan_shows_host_access() {
    let (out, _, code) = kiln(
        &["plan", "tests/manifests/valid-all-fields.yaml"],
        crate_dir(),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("vpc mgmt: internet on, host access (guests reach the host's own addresses)"),
        "{out}"
    );
    assert!(out.contains("vpc lab: internet on (clones"), "{out}");
}

#[test]
fn plan_shows_overrides_and_clone_values() {
    let (out, _, code) = kiln(
        &["plan", "tests/manifests/valid-overrides.yaml"],
        crate_dir(),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("vpc isolated: internet on (clones: internet off)"),
        "{out}"
    );
    assert!(
        out.contains("vm web: 1 vCPU, 4Gi memory (clones: 1 vCPU, 1Gi)"),
        "{out}"
    );
    assert!(
        out.contains(
            "nic eth0 slot 3: subnet lan (vpc isolated), 172.16.0.50, mac 52:54:00:aa:bb:cc"
        ),
        "{out}"
    );
    let (json, _, code) = kiln(
        &["plan", "--json", "tests/manifests/valid-overrides.yaml"],
        crate_dir(),
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["build"]["vms"][0]["memory"], 4u64 << 30);
    assert_eq!(v["base"]["vms"][0]["memory"], 1u64 << 30);
    assert_eq!(
        v["base"]["vms"][0]["nics"][0]["ip"],
        serde_json::Value::Null
    );
    assert_eq!(v["build"]["vms"][0]["nics"][0]["ip"], "172.16.0.50");
    assert_eq!(v["build"]["vms"][0]["nics"][0]["model"], "rtl8139");
}

#[test]
fn plan_never_prints_the_ssh_password() {
    let (json, _, code) = kiln(
        &["plan", "--json", "tests/manifests/valid-all-fields.yaml"],
        crate_dir(),
    );
    assert_eq!(code, 0);
    assert!(!json.contains("changeme"));
    assert!(json.contains("<redacted>"));
    let (out, _, _) = kiln(
        &["plan", "tests/manifests/valid-all-fields.yaml"],
        crate_dir(),
    );
    assert!(!out.contains("changeme"));
}

#[test]
fn schema_is_json_schema_with_every_field() {
    let (out, _, code) = kiln(&["schema"], crate_dir());
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let vm = &v["$defs"]["VM"]["properties"];
    for f in [
        "name",
        "source",
        "resources",
        "disks",
        "communicator",
        "cloudInit",
        "nics",
        "bootCommand",
        "efiFirmware",
        "provisioners",
        "isos",
        "floppy",
        "invisible",
    ] {
        assert!(vm.get(f).is_some(), "VM.{f} missing from the schema");
    }
    assert_eq!(
        v["$defs"]["Communicator"]["properties"]["sshPort"]["maximum"],
        65535
    );
    assert_eq!(
        v["$defs"]["Provisioner"]["properties"]["type"]["enum"][3],
        "windows-update"
    );
}

/// Hostile inputs: each gets a clear error well within a second, never a hang or crash.
#[test]
fn hostile_inputs_fail_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..30 {
        let p = format!("*a{}", i - 1);
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bomb.yaml",
            bomb.into_bytes(),
            "more than 100000 YAML nodes",
        ),
        (
            "deep.yaml",
            format!("vms: {}", "[".repeat(200_000)).into_bytes(),
            "nesting too deep",
        ),
        (
            "deepblock.yaml",
            (0..1000)
                .map(|i| format!("{}- \n", " ".repeat(i)))
                .collect::<String>()
                .into_bytes(),
            "nest",
        ),
        (
            "binary.yaml",
            vec![0xff, 0xfe, 0x00, 0x01, 0x80],
            "not UTF-8",
        ),
        ("huge.yaml", vec![b'#'; 5 << 20], "the limit is 4 MiB"),
        (
            "wide.yaml",
            format!("vms: [{}]", vec!["1"; 150_000].join(",")).into_bytes(),
            "more than 100000 YAML nodes",
        ),
    ];
    for (name, bytes, expect) in cases {
        std::fs::write(dir.path().join(name), bytes).expect("write");
        let start = Instant::now();
        let (out, _, code) = kiln(&["validate", name], dir.path());
        let took = start.elapsed();
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains(expect),
            "{name}: expected {expect:?} in\n{}",
            &out[..out.len().min(2000)]
        );
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
    }
}
