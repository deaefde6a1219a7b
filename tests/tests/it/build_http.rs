//! `httpDirectory` in a build: named `files` (one inline, one `url` fetched by kiln from a
//! loopback server) are served at the VM's gateway, and a shell step finds them through
//! `KILN_HTTP_ADDR` / `PACKER_HTTP_ADDR`. The captured disk holds what the guest fetched.
//! The build runs with no internet: the guest's only peer is kiln's gateway.

use crate::build_common::*;

#[test]
fn http_directory_files_reach_the_guest_at_its_gateway() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let port = kiln_e2e::http::Server::bytes("fetched by kiln from a url\n").port;
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("webfiles.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"vms:
  - name: box
    source:
      bootstrap: {{ distro: debian, suite: bookworm, packages: [busybox] }}
    resources: {{ cpu: 1, memory: 512Mi }}
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: fetch
        type: shell
        shell:
          inline: |
            set -eu
            echo "addr $KILN_HTTP_ADDR"
            busybox wget -q -O /root/greeting "http://$KILN_HTTP_ADDR/greeting.txt"
            busybox wget -q -O /root/remote "http://$PACKER_HTTP_IP:$PACKER_HTTP_PORT/remote.txt"
            if busybox wget -q -O /root/absent "http://$KILN_HTTP_ADDR/absent.txt"; then exit 9; fi
files:
  - name: greeting.txt
    inline: "served by kiln's gateway\n"
  - name: remote.txt
    url: http://127.0.0.1:{port}/remote.txt
httpDirectory:
  files:
    - name: greeting.txt
    - name: remote.txt
"#
        ),
    )
    .unwrap();
    let modules = tmp.path().join("modules");
    let out = build_into(&kiln, &manifest, &modules);
    assert!(out.status.success(), "kiln build failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("httpDirectory: greeting.txt, remote.txt served at http://<gateway>:8080/"),
        "the build says where the files are"
    );
    assert!(
        all.contains("addr 10.0.2.1:8080"),
        "the step was told the address"
    );

    let disk = modules.join("webfiles/disks/box-root.qcow2");
    qemu_img_check(&disk).expect("qemu-img check");
    let work = tmp.path().join("inspect");
    std::fs::create_dir_all(&work).unwrap();
    assert_eq!(
        read_guest_file(&disk, &work, "/root/greeting").unwrap(),
        "served by kiln's gateway\n"
    );
    assert_eq!(
        read_guest_file(&disk, &work, "/root/remote").unwrap(),
        "fetched by kiln from a url\n"
    );
}
