//! `kiln build examples/pair.yaml` end to end: two VMs on the module network, `client` fetches
//! a page from `web` by name (kiln-net's DHCP and DNS, kiln-vmm's vhost-user-net backend under
//! QEMU TCG). The captured disks are then inspected from outside the guests.
//!
//! The example's VPC has no internet and the build runs with `--no-internet`: no frame leaves
//! the build's own user-space network.

use std::path::Path;
use std::process::Command;

use crate::build_common::*;

/// Whether `path` exists in the ext4 root of `qcow2` (after `read_guest_file` made
/// the raw copy in `work`).
fn guest_has(work: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(ext4_root(&work.join("inspect.raw")).unwrap())
        .output()
        .expect("running debugfs");
    String::from_utf8_lossy(&out.stdout).contains("Inode:")
}

#[test]
fn pair_builds_and_the_client_fetched_from_web_by_name() {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(reason) => {
            kiln_e2e::skip(reason);
            return;
        }
    };
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    let m = modules.to_str().unwrap();
    let out = run_kiln(
        &kiln,
        &[
            "build",
            "examples/pair.yaml",
            "--output",
            m,
            "--no-internet",
        ],
    );
    assert!(out.status.success(), "kiln build failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("network: subnet lab 10.20.0.0/24 in VPC lab, gateway 10.20.0.1"),
        "the build network is announced"
    );

    let module = modules.join("pair");
    assert!(
        hidden_entries(&modules).is_empty(),
        "leftovers: {:?}",
        hidden_entries(&modules)
    );
    // Clones inherit the base network.
    let base = std::fs::read_to_string(module.join("base.yaml")).unwrap();
    assert!(
        base.contains("10.20.0.0/24") && base.contains("client"),
        "{base}"
    );

    // web: the page and the enabled server unit.
    let web = module.join("disks/web-root.qcow2");
    qemu_img_check(&web).unwrap();
    let wdir = tmp.path().join("web");
    std::fs::create_dir_all(&wdir).unwrap();
    assert_eq!(
        read_guest_file(&web, &wdir, "/srv/www/index.html").unwrap(),
        "<h1>served by web</h1>\n"
    );
    let unit = read_guest_file(&web, &wdir, "/etc/systemd/system/kiln-httpd.service").unwrap();
    assert!(unit.contains("busybox httpd -f -p 80"), "{unit}");
    assert!(guest_has(
        &wdir,
        "/etc/systemd/system/multi-user.target.wants/kiln-httpd.service"
    ));

    // client: what it fetched over the network, and the address `web` resolved to.
    let client = module.join("disks/client-root.qcow2");
    qemu_img_check(&client).unwrap();
    let cdir = tmp.path().join("client");
    std::fs::create_dir_all(&cdir).unwrap();
    assert_eq!(
        read_guest_file(&client, &cdir, "/root/from-web.html").unwrap(),
        "<h1>served by web</h1>\n",
        "the client's disk holds the page it fetched from web"
    );
    let addr = read_guest_file(&client, &cdir, "/root/web-address").unwrap();
    let mut f = addr.split_whitespace();
    let ip = f.next().unwrap_or_default();
    assert!(
        ip.starts_with("10.20.0.") && ip != "10.20.0.1",
        "web resolved to a lease of the lab subnet: {addr:?}"
    );
    assert_eq!(f.next(), Some("web"), "{addr:?}");
    assert!(
        !guest_has(&cdir, "/srv/www/index.html"),
        "web's file is not on client"
    );
    let log = std::fs::read_to_string(module.join("logs/client.log")).unwrap();
    assert!(log.contains(&format!("client fetched from {ip}")), "{log}");
    eprintln!("build_pair took {:.0} s", started.elapsed().as_secs_f64());
}
