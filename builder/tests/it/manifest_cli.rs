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
    assert_eq!(v["build"]["vms"][0]["nics"][0]["model"], "virtio");
}

#[test]
fn plan_never_prints_the_ssh_password() {
    // `sshPassword` on a bootstrap VM (reached through the agent) is refused: the error names
    // the field without quoting its line.
    let m = "tests/manifests/invalid-unsupported-fields.yaml";
    let (out, err, code) = kiln(&["plan", "--json", m], crate_dir());
    assert_ne!(code, 0);
    assert!(
        !out.contains("changeme") && !err.contains("changeme"),
        "{out}{err}"
    );
    assert!(
        format!("{out}{err}").contains("`sshPassword` has no effect on a `bootstrap` source"),
        "{out}{err}"
    );
    // Taken with `type: ssh`, and still never printed.
    let m = "tests/manifests/valid-blank-iso.yaml";
    for args in [
        &["plan", "--json", m][..],
        &["plan", m],
        &["validate", "--json", m],
    ] {
        let (out, err, _) = kiln(args, crate_dir());
        assert!(
            !format!("{out}{err}").contains("s3cret-lab-pw"),
            "{out}{err}"
        );
    }
    let (out, err, _) = kiln(&["validate", "--json", m], crate_dir());
    assert!(
        !out.contains("changeme") && !err.contains("changeme"),
        "{out}{err}"
    );
    let (out, _, _) = kiln(&["plan", m], crate_dir());
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
        "bootWait",
        "bootKeyInterval",
        "efiFirmware",
        "boot",
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
    assert_eq!(
        v["$defs"]["VM"]["properties"]["boot"]["enum"],
        serde_json::json!(["auto", "direct", "firmware"])
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

/// `kiln build --json` of an invalid manifest: the last stdout line is a JSON error event with
/// every diagnostic's place, stamped like every event line.
#[test]
fn build_json_reports_an_invalid_manifest_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "build",
            "--json",
            "--output",
            "/nonexistent/never-written",
            "tests/manifests/invalid-unknown-fields.yaml",
        ])
        .current_dir(crate_dir())
        .output()
        .expect("run kiln");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a JSON line on stdout");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(v["event"], "error");
    assert_eq!(v["schema"], 1);
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    let d = v["diagnostics"].as_array().expect("diagnostics");
    assert!(!d.is_empty(), "{v}");
    for d in d {
        assert!(d["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("invalid-unknown-fields.yaml")));
        assert!(d["line"].as_u64().is_some_and(|l| l > 0), "{d}");
        assert!(d["column"].as_u64().is_some_and(|c| c > 0), "{d}");
    }
}

/// `kiln plan --json` of an invalid or missing manifest also ends with a JSON error line.
#[test]
fn plan_json_reports_errors_as_json() {
    for (file, code, with_diagnostics) in [
        ("tests/manifests/invalid-unknown-fields.yaml", 1, true),
        ("tests/manifests/missing.yaml", 2, false),
    ] {
        let (out, err, got) = kiln(&["plan", "--json", file], crate_dir());
        assert_eq!(got, code, "{file}: {err}");
        let v: serde_json::Value =
            serde_json::from_str(out.lines().last().expect("a line")).expect("JSON");
        assert_eq!(v["event"], "error", "{v}");
        assert!(!v["message"].as_str().unwrap_or("").is_empty(), "{v}");
        let n = v["diagnostics"].as_array().map_or(0, Vec::len);
        assert_eq!(n > 0, with_diagnostics, "{v}");
    }
}

/// An error's cause is printed once, not once by the error and again by the chain.
#[test]
fn errors_print_each_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["build", "missing.yaml"][..],
        &["plan", "missing.yaml"],
        &["disk", "info", "missing.qcow2"],
        &["disk", "convert", "missing.qcow2", "out.qcow2"],
    ] {
        let (_, err, code) = kiln(args, dir.path());
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{args:?}: {err}"
        );
    }
}

/// With stderr not a terminal (here, a pipe) nothing kiln prints holds an escape sequence,
/// logs included.
#[test]
fn no_colour_codes_when_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    let (_, err, code) = kiln(&["disk", "create", img.to_str().unwrap(), "1M"], dir.path());
    assert_eq!(code, 0, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["-vv", "disk", "convert", "a.qcow2", "b.qcow2"])
        .current_dir(dir.path())
        .output()
        .expect("run kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The convert logs at info: the test would prove nothing without a log line.
    assert!(err.contains("converted"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}
