//! Crash test: a writer process is killed with SIGKILL mid-stream. Afterwards `qemu-img check`
//! reports no corruption (leaks are acceptable) and every write flushed before the kill reads
//! back intact.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::common::*;
use kiln_disk::{create_overlay, open, OpenOptions};

const SLOT: u64 = 65536 + 4096; // unaligned on purpose: writes straddle clusters
const SLOTS: u64 = 400;

fn slot_data(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; SLOT as usize];
    Rng::new(i * 7919 + 1).fill(&mut b);
    b
}

/// Slot i lives at a scattered position so L2 tables and refcounts keep changing.
fn slot_pos(i: u64) -> u64 {
    (i * 149 % SLOTS) * SLOT
}

/// The child: writes slots forever, flushing every 5 and reporting the count on stdout.
/// Runs only when the parent sets KILN_CRASH_IMAGE.
#[test]
#[ignore = "helper process for crash_mid_stream_leaves_no_corruption"]
fn crash_child() {
    let Ok(path) = std::env::var("KILN_CRASH_IMAGE") else {
        return;
    };
    let dev = open(&path, OpenOptions::read_write()).unwrap();
    for i in 0..SLOTS {
        dev.write_at(&slot_data(i), slot_pos(i)).unwrap();
        if i % 5 == 4 {
            dev.flush().unwrap();
            println!("FLUSHED {}", i + 1);
        }
    }
    println!("DONE");
    // Wait to be killed.
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn crash_mid_stream_leaves_no_corruption() {
    if !have_qemu_img() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; (SLOTS * SLOT) as usize]).unwrap();
    let img = d.path().join("ov.qcow2");
    create_overlay(&img, "base.raw", None).unwrap();

    for kill_after in [3u64, 40] {
        let mut child = kiln_e2e::helper_process::command(module_path!(), "crash_child")
            .env("KILN_CRASH_IMAGE", &img)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut flushed = 0u64;
        let stdout = child.stdout.take().unwrap();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("FLUSHED ") {
                flushed = n.trim().parse().unwrap();
                if flushed >= kill_after * 5 {
                    break;
                }
            }
        }
        // SAFETY-free: kill(2) through std sends SIGKILL.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(flushed > 0, "child never flushed");

        let out = Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("qemu-img check: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            v.get("corruptions").and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{v}"
        );
        assert_eq!(
            v.get("check-errors").and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{v}"
        );

        let dev = open(&img, OpenOptions::read_only()).unwrap();
        for i in 0..flushed {
            let mut got = vec![0u8; SLOT as usize];
            dev.read_at(&mut got, slot_pos(i)).unwrap();
            assert!(
                got == slot_data(i),
                "flushed slot {i} lost (flushed {flushed})"
            );
        }
        eprintln!("killed after {flushed} flushed writes: no corruption, all flushed data intact");
    }
}
