//! The step cache (issue 21), on real guests: a module of several steps built cold; rebuilt
//! unchanged (no step runs); each step edited in turn (a step's script, a `fileRef`'s
//! content only, the first step): every time exactly the steps from the edited one on run;
//! a failed step, fixed, is where the next build starts; and the last cached build's disk
//! holds the same files, compared file by file, as a cold `--no-cache` build of the same
//! manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build_common::*;

/// A module of four steps: a shell step, a file step, a shell step reading that file, and
/// a last shell step. `run` makes the keys this test's own (a comment in the first step), so
/// no layer of an earlier run is found by the first build.
fn manifest(run: &str, one: &str, content: &str, two: &str, three: &str) -> String {
    let steps = format!(
        r##"      - name: one
        type: shell
        shell:
          inline: "# {run}\n{one}\n"
      - name: put
        type: file
        file:
          fileRef: data
          destination: /srv/data
      - name: two
        type: shell
        shell:
          inline: "{two}\n"
      - name: three
        type: shell
        shell:
          inline: "{three}\n"
"##
    );
    format!(
        "{}files:\n  - name: data\n    inline: \"{content}\\n\"\n",
        bootstrap_vm("box", &steps)
    )
}

struct Built {
    ok: bool,
    /// 0-based indexes of the steps that ran.
    ran: Vec<usize>,
    /// 0-based indexes of the steps the cache gave.
    cached: Vec<usize>,
    /// (durationMs, frozenMs, diskMs) of each checkpoint.
    checkpoints: Vec<(u64, u64, u64)>,
    stdout: String,
}

fn build(kiln: &Path, dir: &Path, text: &str, extra: &[&str]) -> Built {
    let manifest = dir.join("cached.yaml");
    std::fs::write(&manifest, text).unwrap();
    let modules = dir.join("modules");
    let mut args = vec![
        "build",
        manifest.to_str().unwrap(),
        "--output",
        modules.to_str().unwrap(),
        "--json",
        "--force",
    ];
    args.extend_from_slice(extra);
    let out = run_kiln_reusing(kiln, &args, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut b = Built {
        ok: out.status.success(),
        ran: vec![],
        cached: vec![],
        checkpoints: vec![],
        stdout: stdout.clone(),
    };
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("stepStarted") => b.ran.push(v["index"].as_u64().unwrap() as usize),
            Some("stepsCached") => {
                b.cached = v["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap() as usize)
                    .collect()
            }
            Some("checkpoint") => b.checkpoints.push((
                v["durationMs"].as_u64().unwrap(),
                v["frozenMs"].as_u64().unwrap(),
                v["diskMs"].as_u64().unwrap(),
            )),
            _ => {}
        }
    }
    b
}

fn disk(dir: &Path) -> PathBuf {
    dir.join("modules/cached/disks/box-root.qcow2")
}

/// Every file of the disk's root file system, by path: its kind and content digest (debugfs
/// `rdump` into `into`, then a walk).
fn files_of(qcow2: &Path, into: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(into).unwrap();
    let raw = into.with_extension("raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(qcow2)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", into.display()))
        .arg(ext4_root(&raw).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&raw).unwrap();
    let mut files = BTreeMap::new();
    walk(into, into, &mut files);
    files
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    use sha2::Digest;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.insert(rel, "dir".into());
            walk(root, &p, out);
        } else if m.file_type().is_symlink() {
            out.insert(
                rel,
                format!("-> {}", std::fs::read_link(&p).unwrap().display()),
            );
        } else {
            let data = std::fs::read(&p).unwrap_or_default();
            out.insert(rel, hex::encode(sha2::Sha256::digest(&data)));
        }
    }
}

/// What differs between two builds of the same manifest whatever the cache does: logs,
/// caches and the random state every boot writes.
fn volatile(path: &str) -> bool {
    const UNDER: &[&str] = &[
        "/var/log/",
        "/var/cache/",
        "/var/tmp/",
        "/tmp/",
        "/var/lib/systemd/",
        "/var/lib/dhcp/",
    ];
    UNDER.iter().any(|u| path.starts_with(u))
}

#[test]
fn steps_rebuild_from_the_edited_one_and_match_a_cold_build() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    if !on_path("debugfs") {
        kiln_e2e::skip("debugfs is not installed (e2fsprogs; scripts/setup.sh installs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = format!(
        "run {}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let one = "echo one > /srv/one";
    let two = "cat /srv/data > /srv/two";
    let three = "echo three > /srv/three";
    let m =
        |one: &str, content: &str, two: &str, three: &str| manifest(&run, one, content, two, three);

    // Cold: every step runs, each takes a layer.
    let b = build(&kiln, dir, &m(one, "data 1", two, three), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![0, 1, 2, 3]);
    assert!(b.cached.is_empty());
    assert_eq!(b.checkpoints.len(), 4, "{}", b.stdout);
    for (total, frozen, disk) in &b.checkpoints {
        eprintln!(
            "checkpoint: {total} ms; the guest's file systems frozen for {frozen} ms of it, \
             {disk} ms of that in kiln's block layer"
        );
    }
    qemu_img_check(&disk(dir)).unwrap();
    let yaml = std::fs::read_to_string(dir.join("modules/cached/module.yaml")).unwrap();
    assert_eq!(
        yaml.matches("key: ").count(),
        4,
        "module.yaml records 4 layers: {yaml}"
    );

    // Unchanged: no step runs.
    let b = build(&kiln, dir, &m(one, "data 1", two, three), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, Vec::<usize>::new());
    assert_eq!(b.cached, vec![0, 1, 2, 3]);
    assert!(yaml_reused(dir) == 4, "all 4 layers recorded as reused");

    // The third step fails: steps 1-2 come from the cache; the fixed third step is where the
    // next build starts.
    let b = build(&kiln, dir, &m(one, "data 1", "exit 7", three), &[]);
    assert!(!b.ok, "the failing step must fail the build");
    assert_eq!(b.ran, vec![2]);
    assert_eq!(b.cached, vec![0, 1]);
    let two_b = "cat /srv/data /srv/one > /srv/two";
    let b = build(&kiln, dir, &m(one, "data 1", two_b, three), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![2, 3]);
    assert_eq!(b.cached, vec![0, 1]);
    let work = dir.join("inspect");
    std::fs::create_dir_all(&work).unwrap();
    assert_eq!(
        read_guest_file(&disk(dir), &work, "/srv/two").unwrap(),
        "data 1\none\n"
    );

    // Only the file's content changes: the file step and everything after it run.
    let b = build(&kiln, dir, &m(one, "data 2", two_b, three), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![1, 2, 3]);
    assert_eq!(b.cached, vec![0]);

    // The first step edited: everything runs.
    let one_b = "echo one-b > /srv/one";
    let three_b = "echo three-b > /srv/three";
    let b = build(&kiln, dir, &m(one_b, "data 2", two_b, three_b), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![0, 1, 2, 3]);
    assert!(b.cached.is_empty());
    let cached_files = files_of(&disk(dir), &dir.join("cached-files"));

    // The last step edited: only it runs; built from the cache and then cold, the two disks
    // hold the same files.
    let three_c = "echo three-c > /srv/three";
    let b = build(&kiln, dir, &m(one_b, "data 2", two_b, three_c), &[]);
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![3]);
    assert_eq!(b.cached, vec![0, 1, 2]);
    let from_cache = files_of(&disk(dir), &dir.join("from-cache"));
    let b = build(
        &kiln,
        dir,
        &m(one_b, "data 2", two_b, three_c),
        &["--no-cache"],
    );
    assert!(b.ok, "{}", b.stdout);
    assert_eq!(b.ran, vec![0, 1, 2, 3], "--no-cache runs every step");
    let cold = files_of(&disk(dir), &dir.join("cold"));
    let differ: Vec<String> = from_cache
        .keys()
        .chain(cold.keys())
        .filter(|p| !volatile(p) && from_cache.get(*p) != cold.get(*p))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|p| {
            format!(
                "{p}: cached {:?}, cold {:?}",
                from_cache.get(p),
                cold.get(p)
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "files that differ between the cached and the cold build: {differ:?}"
    );
    assert_eq!(cold["/srv/three"], from_cache["/srv/three"]);
    assert_ne!(
        cached_files["/srv/three"], cold["/srv/three"],
        "the compared builds saw the last edit"
    );
    assert!(from_cache.len() > 1000, "a whole root was compared");
}

/// How many of module.yaml's layers are recorded as reused.
fn yaml_reused(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("modules/cached/module.yaml"))
        .unwrap()
        .matches("reused: true")
        .count()
}
