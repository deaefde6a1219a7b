//! The runtime folder (the sockets `kiln exec` connects to) must be the user's own: one that
//! others can write to, that is a link, or that another user owns is refused with its path,
//! and kiln never talks to a socket planted there.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

use crate::build_common::*;

fn exec_with_run_dir(kiln: &Path, run_dir: &Path) -> Output {
    let out = Command::new(kiln)
        .args(["exec", "--wait-secs", "2", "web-1/box", "--", "id"])
        .env("KILN_RUN_DIR", run_dir)
        .output()
        .expect("running kiln");
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A fake agent socket where `kiln exec web-1/box` would look, in `run_dir`.
fn plant_socket(run_dir: &Path) -> UnixListener {
    let d = run_dir.join("clones/web-1/box");
    std::fs::create_dir_all(&d).unwrap();
    let l = UnixListener::bind(d.join("vsock.sock")).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

fn assert_never_connected(l: &UnixListener) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok(_) => panic!("kiln connected to the planted socket"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn exec_refuses_a_runtime_folder_others_can_write() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let fake = plant_socket(&run);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = exec_with_run_dir(&kiln, &run);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&run.display().to_string()) && err.contains("mode 0777"),
        "{err}"
    );
    assert_never_connected(&fake);
}

#[test]
fn exec_refuses_a_runtime_folder_that_is_a_link() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fake = plant_socket(&real);
    let link = tmp.path().join("run");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = exec_with_run_dir(&kiln, &link);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");
    assert_never_connected(&fake);
}

#[test]
fn exec_refuses_a_runtime_folder_of_another_user() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    if !is_root() {
        kiln_e2e::skip("giving a folder to another user needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fake = plant_socket(&run);
    // As a local user who made the folder first would own it.
    std::os::unix::fs::chown(&run, Some(4242), Some(4242)).unwrap();
    let out = exec_with_run_dir(&kiln, &run);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 4242"), "{err}");
    assert_never_connected(&fake);
}

#[test]
fn a_missing_runtime_folder_is_made_for_its_owner_only() {
    let Some(kiln) = kiln_bin() else {
        kiln_e2e::skip("the kiln binary is not built next to this test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = exec_with_run_dir(&kiln, &run);
    // Nothing runs there, but the folder is now the user's own.
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
    let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
