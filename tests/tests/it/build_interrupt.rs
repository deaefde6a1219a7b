//! Ctrl-C in each phase of a build (boot, step, capture): `kiln build` exits 130, writes no
//! module, and leaves no process and no file behind but the logs it names.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::build_common::*;

/// When the test sends Ctrl-C.
#[derive(Clone, Copy, Debug)]
enum At {
    /// The VM is booting (its QEMU runs; the agent has not answered yet).
    Boot,
    /// A step runs in the guest.
    Step,
    /// The disks are being captured.
    Capture,
}

impl At {
    /// True when `line`, one `--json` event, marks the moment to interrupt.
    fn reached(self, line: &str) -> bool {
        let Ok(v) = serde_json_line(line) else {
            return false;
        };
        match self {
            At::Boot => v.event == "vm" && v.phase == "Booting",
            At::Step => line.contains("started-long-step"),
            At::Capture => v.event == "build" && v.phase == "CapturingDisks",
        }
    }
}

/// The two fields of an event line the test needs, read without a JSON dependency.
struct EventHead {
    event: String,
    phase: String,
}

fn serde_json_line(line: &str) -> Result<EventHead, ()> {
    let field = |name: &str| -> Option<String> {
        let key = format!("\"{name}\":\"");
        let start = line.find(&key)? + key.len();
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_string())
    };
    Ok(EventHead {
        event: field("event").ok_or(())?,
        phase: field("phase").unwrap_or_default(),
    })
}

/// Pids of every process whose command line mentions `needle` (the test's own folder, which
/// every QEMU of the build names in its disk and socket paths).
fn processes_naming(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// A kept log: under a folder named `logs` or `.logs`, or an events log.
fn is_log(rel: &Path) -> bool {
    rel.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "logs" || c == ".logs"
    })
}

fn interrupt_at(at: At) {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = private_run_dir(tmp.path());
    let step = match at {
        At::Step => "echo started-long-step; sleep 600",
        _ => "echo quick",
    };
    let manifest = tmp.path().join("interrupted.yaml");
    std::fs::write(
        &manifest,
        format!(
            "vms:\n  - name: box\n    source:\n      bootstrap: {{ distro: debian, suite: bookworm, packages: [] }}\n    resources: {{ cpu: 1, memory: 1Gi }}\n    disks:\n      - name: root\n        size: 4Gi\n    provisioners:\n      - name: step\n        type: shell\n        shell:\n          inline: \"{step}\\n\"\n"
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    let mut child = Command::new(&kiln)
        // Every step runs: an earlier run's layers must not skip the phase under test.
        .args([
            "build",
            manifest.to_str().unwrap(),
            "--json",
            "--no-cache",
            "--output",
        ])
        .arg(&modules)
        .env("KILN_NO_INTERNET", "true")
        .env("KILN_RUN_DIR", &run_dir)
        .current_dir(repo_root())
        // Its own process group, so the test can send Ctrl-C as a terminal does: to the
        // whole group, QEMU included.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut events = Vec::new();
    let mut reached = false;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        events.push(line.clone());
        if at.reached(&line) {
            reached = true;
            break;
        }
    }
    assert!(
        reached,
        "never reached {at:?}; events:\n{}",
        events.join("\n")
    );
    let pgid = child.id().to_string();
    Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    for line in lines {
        events.push(line.unwrap());
    }
    let st = child.wait().unwrap();
    let stderr = err_reader.join().unwrap();
    eprintln!("--- events\n{}\n--- stderr\n{stderr}", events.join("\n"));
    assert_eq!(
        st.code(),
        Some(130),
        "exit status after Ctrl-C at {at:?}: {st}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.contains("\"Succeeded\"") && e.contains("\"build\"")),
        "the build reported success after Ctrl-C"
    );
    assert!(
        !modules.join("interrupted").exists(),
        "a module was written"
    );

    // No process of the build is left: every QEMU names the test's folder.
    let needle = tmp.path().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = processes_naming(&needle);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = processes_naming(&needle);
    }
    assert!(left.is_empty(), "processes left after Ctrl-C: {left:?}");

    // No file or folder is left but the logs.
    if let Ok(rd) = std::fs::read_dir(&modules) {
        let top: Vec<_> = rd
            .flatten()
            .map(|e| PathBuf::from(e.file_name()))
            .filter(|p| !is_log(p))
            .collect();
        assert!(top.is_empty(), "left in the output folder: {top:?}");
    }
    let stray: Vec<_> = files_under(&modules)
        .into_iter()
        .filter(|p| !is_log(p))
        .collect();
    assert!(stray.is_empty(), "files left in the output: {stray:?}");
    let run_left = files_under(&run_dir);
    assert!(
        run_left.is_empty(),
        "files left in the runtime folder: {run_left:?}"
    );
}

#[test]
fn ctrl_c_while_booting() {
    interrupt_at(At::Boot);
}

#[test]
fn ctrl_c_during_a_step() {
    interrupt_at(At::Step);
}

#[test]
fn ctrl_c_during_capture() {
    interrupt_at(At::Capture);
}
