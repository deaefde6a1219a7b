//! `kiln console` during a real build: the build names each VM's console in a note, `kiln
//! console <build>/<vm> --json` gives the VM's VNC socket and one-time password, a VNC client
//! authenticates with them and sees a screen, and `--listen` forwards a loopback port to it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::build_common::*;

#[test]
fn kiln_console_gives_a_running_build_vm_screen() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = private_run_dir(tmp.path());
    let manifest = tmp.path().join("consoled.yaml");
    std::fs::write(
        &manifest,
        "vms:\n  - name: box\n    source:\n      bootstrap: { distro: debian, suite: bookworm, packages: [] }\n    resources: { cpu: 1, memory: 1Gi }\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n      - name: wait\n        type: shell\n        shell:\n          inline: \"echo started-long-step; sleep 600\\n\"\n",
    )
    .unwrap();
    let mut build = Command::new(&kiln)
        .args([
            "build",
            manifest.to_str().unwrap(),
            "--json",
            "--engine",
            "qemu",
            "--output",
        ])
        .arg(tmp.path().join("modules"))
        .env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", &run_dir)
        .current_dir(repo_root())
        // Its own group, so Ctrl-C reaches the build and its QEMU as from a terminal.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stop_build = |build: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-INT", "--", &format!("-{}", build.id())])
            .status();
        let _ = build.wait();
    };
    let mut events = Vec::new();
    let mut note = false;
    for line in BufReader::new(build.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        note |= line.contains("console: kiln console consoled/box");
        events.push(line.clone());
        if line.contains("started-long-step") {
            break;
        }
    }
    if !events.iter().any(|l| l.contains("started-long-step")) {
        stop_build(&mut build);
        panic!("the step never started; events:\n{}", events.join("\n"));
    }
    assert!(note, "no console note; events:\n{}", events.join("\n"));

    let out = Command::new(&kiln)
        .args(["console", "consoled/box", "--json"])
        .env("KILN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            stop_build(&mut build);
            panic!("kiln console --json: {e}: {text}\n{err}");
        }
    };
    let socket = v["socket"].as_str().unwrap_or_default().to_string();
    let password = v["password"].as_str().unwrap_or_default().to_string();
    let direct = std::os::unix::net::UnixStream::connect(&socket).map(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        kiln_e2e::rfb::handshake(&mut s, &password)
    });

    // The same through a loopback port that `--listen` forwards.
    let mut fwd = Command::new(&kiln)
        .args(["console", "box", "--json", "--listen", "127.0.0.1:0"])
        .env("KILN_RUN_DIR", &run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let _ = BufReader::new(fwd.stdout.take().unwrap()).read_line(&mut first);
    let listen = serde_json::from_str::<serde_json::Value>(&first)
        .ok()
        .and_then(|v| v["listen"].as_str().map(str::to_string));
    let forwarded = listen.as_deref().map(|addr| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        kiln_e2e::rfb::handshake(&mut s, &password)
    });
    let _ = fwd.kill();
    let _ = fwd.wait();
    stop_build(&mut build);

    assert_eq!(v["build"], "consoled", "{v}");
    assert_eq!(v["vm"], "box", "{v}");
    assert_eq!(password.len(), 8, "{v}");
    assert!(socket.starts_with(run_dir.to_str().unwrap()), "{v}");
    let h = direct
        .unwrap_or_else(|e| panic!("connecting to {socket}: {e}"))
        .unwrap();
    assert_eq!(h.security_types, [kiln_e2e::rfb::VNC_AUTH], "{h:?}");
    let init = h
        .result
        .expect("the password from kiln console is accepted");
    assert!(init.width > 0 && init.height > 0, "{init:?}");
    let h = forwarded
        .unwrap_or_else(|| panic!("no listen address from --listen: {first:?}"))
        .unwrap();
    assert!(h.result.is_ok(), "through --listen: {h:?}");
}
