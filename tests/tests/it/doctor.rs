//! `kiln doctor --json`: the probe, the kvm smoke test and the host firmware, and `auto`
//! reading the smoke test's cached result. Each test uses its own cache folder.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::build_common::*;

fn doctor_json(kiln: &Path, cache: &Path, args: &[&str]) -> Value {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = run_kiln_with(kiln, &all, &[("KILN_CACHE", cache)]);
    assert!(out.status.success(), "kiln doctor failed");
    serde_json::from_slice(&out.stdout).expect("kiln doctor --json prints one JSON object")
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_str()
        .unwrap_or_else(|| panic!("{} is not a string in {v:#}", path.join(".")))
}

#[test]
fn doctor_json_reports_probe_smoke_firmware_and_auto() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let v = doctor_json(&kiln, tmp.path(), &[]);

    // The probe, at the top level.
    assert!(["kvm", "qemu"].contains(&str_of(&v, &["recommended_engine"])));
    assert!(!str_of(&v, &["reason"]).is_empty());
    assert!(!str_of(&v, &["vendor"]).is_empty());
    assert!(!str_of(&v, &["kvm", "state"]).is_empty());
    assert!(
        v["capabilities"].is_array() && v["stock_kernel_ok"].is_boolean(),
        "{v:#}"
    );

    // The smoke test: run or not, always with a reason.
    let smoke = &v["smoke"];
    assert!(
        smoke["ran"].is_boolean() && smoke["cached"].is_boolean(),
        "{v:#}"
    );
    assert!(!str_of(smoke, &["reason"]).is_empty());
    if smoke["ran"] == Value::Bool(true) {
        assert!(
            smoke["passed"].is_boolean() && smoke["when"].is_string(),
            "{v:#}"
        );
    } else {
        assert!(smoke["passed"].is_null(), "{v:#}");
    }

    // Firmware: every path reported exists, and every file installed is reported.
    let fw = &v["firmware"];
    let files = [
        (&["seabios", "path"][..], "/usr/share/seabios/bios-256k.bin"),
        (&["ovmf", "code"][..], "/usr/share/OVMF/OVMF_CODE_4M.fd"),
        (&["ovmf", "vars"][..], "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        (
            &["ovmf", "code_secure_boot"][..],
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        ),
        (
            &["ovmf", "vars_microsoft"][..],
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        ),
    ];
    for (path, debian) in files {
        let mut x = fw;
        for k in path {
            x = &x[*k];
        }
        match x {
            Value::String(p) => assert!(Path::new(p).is_file(), "{p} reported but absent"),
            Value::Null => assert!(
                !Path::new(debian).is_file() || std::env::var_os("KILN_FIRMWARE_DIR").is_some(),
                "{debian} is installed but firmware.{} is null",
                path.join(".")
            ),
            other => panic!("firmware.{}: {other}", path.join(".")),
        }
    }
    for pkg in ["seabios", "ovmf"] {
        let version = &fw[pkg]["package_version"];
        assert!(version.is_string() || version.is_null(), "{fw:#}");
    }
    let secure = fw["secure_boot"].as_bool().expect("firmware.secure_boot");
    assert_eq!(
        secure,
        fw["ovmf"]["code_secure_boot"].is_string() && fw["ovmf"]["vars_microsoft"].is_string()
    );
    assert!(fw["bios"].is_boolean() && fw["uefi"].is_boolean(), "{fw:#}");

    // What auto picks: kvm only where the probe and a passed smoke test both say so.
    let auto = str_of(&v, &["auto", "engine"]);
    assert!(!str_of(&v, &["auto", "why"]).is_empty());
    if auto == "kvm" {
        assert_eq!(v["stock_kernel_ok"], Value::Bool(true), "{v:#}");
        assert_eq!(smoke["passed"], Value::Bool(true), "{v:#}");
    }
}

/// On a host whose KVM cannot run a stock kernel (PVM here), a forced smoke test fails
/// within its bound with a reason, is cached, and `auto` reads it back. Where KVM can run
/// one, the same test must pass and `auto` picks kvm.
#[test]
fn forced_smoke_test_is_bounded_cached_and_read_by_auto() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let kernel = match std::env::var_os("KILN_TEST_KERNEL") {
        Some(k) => k.into(),
        None => match kiln_e2e::kernel::guest_kernel() {
            Ok(k) => k.vmlinuz,
            Err(e) => {
                kiln_e2e::skip(format!(
                    "forced_smoke_test_is_bounded_cached_and_read_by_auto: no test kernel: {e}"
                ));
                return;
            }
        },
    };
    let tmp = tempfile::tempdir().unwrap();
    let k = kernel.to_str().expect("utf-8 kernel path");
    let started = Instant::now();
    let v = doctor_json(&kiln, tmp.path(), &["--smoke", "--smoke-kernel", k]);
    let took = started.elapsed();
    let smoke = &v["smoke"];
    eprintln!("smoke test took {took:?}: {smoke:#}");
    assert_eq!(smoke["ran"], Value::Bool(true), "{v:#}");
    assert_eq!(smoke["cached"], Value::Bool(false), "{v:#}");
    assert_eq!(str_of(smoke, &["kernel"]), k);
    let reason = str_of(smoke, &["reason"]).to_string();
    let when = str_of(smoke, &["when"]).to_string();
    // 20 s bound, plus the probe, hashing the kernel and start-up on a loaded machine.
    assert!(took < Duration::from_secs(45), "took {took:?}");

    let results: Vec<_> = std::fs::read_dir(tmp.path().join("smoke"))
        .expect("the result is cached under <cache>/smoke")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(results[0].ends_with(".json"), "{results:?}");

    // Read back, without running again, by the report and by auto.
    let again = doctor_json(&kiln, tmp.path(), &[]);
    assert_eq!(again["smoke"]["cached"], Value::Bool(true), "{again:#}");
    assert_eq!(str_of(&again, &["smoke", "when"]), when);
    let why = str_of(&again, &["auto", "why"]);
    if v["stock_kernel_ok"] == Value::Bool(true) {
        assert_eq!(smoke["passed"], Value::Bool(true), "{v:#}");
        assert_eq!(str_of(&again, &["auto", "engine"]), "kvm");
        assert!(
            why.contains(&format!("passed the smoke test on {when}")),
            "{why}"
        );
    } else {
        assert_eq!(smoke["passed"], Value::Bool(false), "{v:#}");
        assert!(
            reason.contains("no sign of userspace within")
                || reason.contains("the VM ended before userspace"),
            "{reason}"
        );
        assert!(!str_of(smoke, &["console_tail"]).contains(kiln_vmm_marker()));
        assert_eq!(str_of(&again, &["auto", "engine"]), "qemu");
        assert!(
            why.contains(&format!("kvm failed the smoke test on {when}: {reason}")),
            "{why}"
        );
    }
}

/// The line the smoke test's /init prints (kiln-vmm's `smoke::MARKER`).
fn kiln_vmm_marker() -> &'static str {
    "kiln-smoke: userspace reached"
}

/// "Can I build here?": every finding has a status and a fix when not fine; with PATH lacking
/// QEMU (and no KILN_QEMU) on a host where builds need it, the qemu finding fails and so does
/// `kiln doctor`.
#[test]
fn doctor_findings_and_a_path_without_qemu() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let v = doctor_json(&kiln, tmp.path(), &[]);
    let checks = v["checks"].as_array().expect("checks is a list");
    for c in checks {
        let status = str_of(c, &["status"]);
        assert!(["ok", "warn", "fail"].contains(&status), "{c}");
        assert_eq!(c["fix"].is_string(), status != "ok", "{c}");
    }
    let names: Vec<&str> = checks.iter().map(|c| str_of(c, &["check"])).collect();
    for want in ["kvm", "qemu", "agent", "cache", "runtime folder"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(v["can_build"], true, "{v:#}");

    if str_of(&v, &["auto", "engine"]) != "qemu" {
        kiln_e2e::skip("auto picks kiln's VMM here: a missing QEMU only warns");
        return;
    }
    let empty = tmp.path().join("bin");
    std::fs::create_dir(&empty).unwrap();
    let out = std::process::Command::new(&kiln)
        .args(["doctor", "--json"])
        .env("PATH", &empty)
        .env_remove("KILN_QEMU")
        .env("KILN_CACHE", tmp.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "kiln doctor must fail without QEMU"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["can_build"], false);
    let qemu = checks_named(&v, "qemu");
    assert_eq!(str_of(qemu, &["status"]), "fail", "{qemu}");
    assert!(str_of(qemu, &["fix"]).contains("qemu-system-x86"), "{qemu}");
}

fn checks_named<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["check"] == name))
        .unwrap_or_else(|| panic!("no {name} finding in {v:#}"))
}
