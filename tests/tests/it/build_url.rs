//! `kiln build` of images that do not carry kiln's agent: a `url` source (a compressed qcow2
//! served by a loopback HTTP server in the test, with its `checksum`) and a `file` source (a
//! raw image), both partitioned like cloud images, both with a `cloudInit` key. kiln reads
//! each image's kernel from its partition table and ext4 `/boot` (qcow2 through kiln-disk),
//! builds a NoCloud seed whose user-data merges the manifest's `userData` (the file source's
//! VM: `userDataFrom`) with kiln's agent install, boots, runs the steps through the agent, and captures. The captured disks are
//! then read from outside (debugfs at the partition's offset, `qemu-img check`), and a clone
//! of the module boots without a seed and answers `kiln exec`.
//!
//! The image: Debian bookworm from packages (mmdebstrap: systemd, the cloud kernel,
//! cloud-init; no kiln agent), with cloud-init limited to NoCloud and to the modules the
//! seed uses, so it does not wait for network data sources in an offline TCG guest. It is
//! made once and kept in `<kiln cache>/e2e/cloud-image-v1/` (a first run adds the
//! mmdebstrap time: 4 to 12 minutes here).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::build_common::*;
use kiln_e2e::module::{clone_run_exec, CloneExec};

/// Bump when the image recipe below changes.
const IMAGE_DIR: &str = "cloud-image-v1";
/// The root file system's UUID (the image's /etc/fstab names it).
const ROOT_UUID: &str = "5e0c1a3e-8f4e-4c2a-9d55-7c1e2f3a4b5c";
/// The root partition starts at sector 2048.
const PART_OFFSET: u64 = 1 << 20;

/// cloud-init inside the image: NoCloud only (no network data sources to wait for), and the
/// modules kiln's seed and this test use (write_files, runcmd, the user scripts).
const CLOUD_CFG: &str = "\
datasource_list: [ NoCloud ]
cloud_init_modules: [ write-files, set_hostname, update_hostname, update_etc_hosts ]
cloud_config_modules: [ runcmd ]
cloud_final_modules: [ scripts-per-once, scripts-per-boot, scripts-per-instance, scripts-user, final-message ]
";

fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("kiln");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".cache")
        .join("kiln")
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The test image as (raw, qcow2), made on first use.
fn cloud_image() -> Result<(PathBuf, PathBuf), String> {
    let e2e = cache_root().join("e2e");
    let dir = e2e.join(IMAGE_DIR);
    let (raw, q) = (dir.join("cloud.raw"), dir.join("cloud.qcow2"));
    if raw.is_file() && q.is_file() {
        return Ok((raw, q));
    }
    std::fs::create_dir_all(&e2e).map_err(|e| e.to_string())?;
    let tmp = e2e.join(format!(".{IMAGE_DIR}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let root = tmp.join("root");
    eprintln!(
        "making the test cloud image (mmdebstrap, once) in {}",
        tmp.display()
    );
    sh(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--mode=root",
            "--include=systemd-sysv,udev,linux-image-cloud-amd64,cloud-init",
            "bookworm",
        ])
        .arg(&root)
        .stdout(Stdio::null()))?;
    if root.join("usr/local/bin/kiln-agent").exists() {
        return Err("the test image must not carry kiln's agent".into());
    }
    std::fs::write(
        root.join("etc/fstab"),
        format!("UUID={ROOT_UUID} / ext4 defaults 0 1\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        root.join("etc/cloud/cloud.cfg.d/90-kiln-test.cfg"),
        CLOUD_CFG,
    )
    .map_err(|e| e.to_string())?;
    let used: u64 = sh(Command::new("du").args(["-sb"]).arg(&root))?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or("du gave no size")?;
    let fs_mib = (used * 3 / 2 + (256 << 20)).div_ceil(1 << 20);
    let fsimg = tmp.join("fs.raw");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-U", ROOT_UUID, "-d"])
        .arg(&root)
        .arg(&fsimg)
        .arg(format!("{fs_mib}M")))?;
    std::fs::remove_dir_all(&root).map_err(|e| e.to_string())?;
    // GPT: the partition at 1 MiB, room for the backup table at the end.
    let raw_tmp = tmp.join("cloud.raw");
    let f = std::fs::File::create(&raw_tmp).map_err(|e| e.to_string())?;
    f.set_len((fs_mib + 2) << 20).map_err(|e| e.to_string())?;
    drop(f);
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&raw_tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    sf.stdin
        .take()
        .ok_or("sfdisk stdin")?
        .write_all(
            format!(
                "label: gpt\nstart=2048, size={}, type=linux\n",
                fs_mib * 2048
            )
            .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    if !sf.wait().map_err(|e| e.to_string())?.success() {
        return Err("sfdisk failed".into());
    }
    // The file system into the partition, leaving zero blocks as holes.
    {
        let mut src = std::fs::File::open(&fsimg).map_err(|e| e.to_string())?;
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_tmp)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                let r = src.read(&mut buf[n..]).map_err(|e| e.to_string())?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], PART_OFFSET + off)
                    .map_err(|e| e.to_string())?;
            }
            off += n as u64;
        }
    }
    std::fs::remove_file(&fsimg).map_err(|e| e.to_string())?;
    sh(Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw_tmp)
        .arg(tmp.join("cloud.qcow2")))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Made by a concurrent run meanwhile.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    eprintln!("test cloud image made in {:.0}s", t.elapsed().as_secs_f64());
    Ok((raw, q))
}

/// Reads a file from the ext4 root partition of a captured qcow2 disk.
fn guest_file(raw: &Path, path: &str) -> Result<String, String> {
    let image = format!("{}?offset={PART_OFFSET}", raw.display());
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(&image)
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || err.contains("File not found") {
        return Err(format!("{path}: {err}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn to_raw(q: &Path, raw: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(q)
        .arg(raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert failed");
}

#[test]
fn url_and_file_images_get_the_agent_through_a_nocloud_seed() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    for t in ["sfdisk", "debugfs", "qemu-img", "mkfs.ext4", "sha256sum"] {
        if !on_path(t)
            && !Path::new("/usr/sbin").join(t).is_file()
            && !Path::new("/sbin").join(t).is_file()
        {
            kiln_e2e::skip(format_args!(
                "{t} is not installed (scripts/packages.txt lists its package)"
            ));
            return;
        }
    }
    let (raw_img, qcow_img) = match cloud_image() {
        Ok(x) => x,
        Err(e) => panic!("making the test cloud image failed: {e}"),
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let server = kiln_e2e::http::Server::file(qcow_img.clone());
    let port = server.port;
    let sum = sh(Command::new("sha256sum").arg(&qcow_img)).unwrap();
    let sum = sum.split_whitespace().next().unwrap().to_string();
    // The file source sits beside the manifest (a hard link: same file system as the cache).
    let local = tmp.path().join("cloud.raw");
    if std::fs::hard_link(&raw_img, &local).is_err() {
        std::fs::copy(&raw_img, &local).unwrap();
    }
    // `userDataFrom`: a cloud-config beside the manifest, read like `scriptFrom`.
    std::fs::write(
        tmp.path().join("user-data.yaml"),
        "#cloud-config\nwrite_files:\n  - path: /etc/from-user-data-file\n    content: \"written from userDataFrom\\n\"\n",
    )
    .unwrap();
    let manifest = tmp.path().join("cloudy.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"vms:
  - name: fromurl
    source:
      url: http://127.0.0.1:{port}/cloud.qcow2
      checksum: sha256:{sum}
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 3Gi
    cloudInit:
      userData: |
        #cloud-config
        write_files:
          - path: /etc/from-user-data
            content: "written by cloud-init\n"
    provisioners:
      - name: mark
        type: shell
        shell:
          inline: |
            set -eu
            grep -q "written by cloud-init" /etc/from-user-data
            echo "built from a url on $(hostname)" > /etc/kiln-url
  - name: fromfile
    source:
      file: cloud.raw
    resources: {{ cpu: 1, memory: 1Gi }}
    disks:
      - name: root
        size: 3Gi
    cloudInit:
      userDataFrom: {{ configMapRef: {{ name: user-data.yaml }} }}
    provisioners:
      - name: mark
        type: shell
        shell:
          inline: |
            set -eu
            grep -q "written from userDataFrom" /etc/from-user-data-file
            echo "built from a file on $(hostname)" > /etc/kiln-file
"#
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    // A cache of its own: the download really goes through the loopback server.
    let cache = tmp.path().join("cache");
    let out = Command::new(&kiln)
        .args([
            "build",
            manifest.to_str().unwrap(),
            "--no-cache",
            "--output",
            m,
        ])
        .env("KILN_CACHE", &cache)
        .output()
        .unwrap();
    eprintln!(
        "--- kiln build stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kiln build failed");
    eprintln!("build: {:.0}s", t0.elapsed().as_secs_f64());
    assert!(server.hits() >= 1, "the url was never fetched");
    assert!(
        hidden_entries(&modules).is_empty(),
        "leftovers: {:?}",
        hidden_entries(&modules)
    );

    let module = modules.join("cloudy");
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    assert!(yaml.contains(&sum), "the url's digest is recorded: {yaml}");
    assert!(
        yaml.matches("agentInImage: true").count() == 2,
        "the seed installed the agent in both: {yaml}"
    );
    assert!(!module.join("work").exists(), "the seed is not kept");

    let url_disk = module.join("disks/fromurl-root.qcow2");
    let file_disk = module.join("disks/fromfile-root.qcow2");
    for d in [&url_disk, &file_disk] {
        qemu_img_check(d).unwrap();
    }
    let raw = tmp.path().join("fromurl.raw");
    to_raw(&url_disk, &raw);
    assert_eq!(
        guest_file(&raw, "/etc/kiln-url").unwrap().trim(),
        "built from a url on fromurl"
    );
    // The manifest's own user-data ran next to kiln's part.
    assert_eq!(
        guest_file(&raw, "/etc/from-user-data").unwrap(),
        "written by cloud-init\n"
    );
    assert!(guest_file(&raw, "/etc/systemd/system/kiln-agent.service")
        .unwrap()
        .contains("kiln-agent --listen vsock:1024"));
    // Clones have no seed: their agent must not wait for cloud-init.
    let defaults = guest_file(&raw, "/etc/default/kiln-agent").unwrap();
    assert!(!defaults.contains("boot-finished"), "{defaults}");
    std::fs::remove_file(&raw).unwrap();
    let raw = tmp.path().join("fromfile.raw");
    to_raw(&file_disk, &raw);
    assert_eq!(
        guest_file(&raw, "/etc/kiln-file").unwrap().trim(),
        "built from a file on fromfile"
    );
    assert!(guest_file(&raw, "/etc/from-user-data").is_err());
    // `userDataFrom`'s cloud-config ran next to kiln's part.
    assert_eq!(
        guest_file(&raw, "/etc/from-user-data-file").unwrap(),
        "written from userDataFrom\n"
    );
    std::fs::remove_file(&raw).unwrap();

    // A clone boots without any seed and its agent answers.
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "cloudy",
            modules: &modules,
            clones: &tmp.path().join("clones"),
            count: None,
            vm: "fromurl",
            run_dir: &tmp.path().join("run"),
            env: &[("KILN_CACHE", cache.as_os_str())],
        },
        &["cat", "/etc/kiln-url"],
    )
    .unwrap();
    assert!(exec.status.success());
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "built from a url on fromurl"
    );
    eprintln!(
        "whole test after the image: {:.0}s",
        t0.elapsed().as_secs_f64()
    );
}
