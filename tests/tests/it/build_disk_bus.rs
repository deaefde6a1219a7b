//! A disk on `bus: scsi` in a real build: kiln-disk serves it as an NBD export that QEMU
//! attaches through virtio-scsi, the guest sees it and writes to it, and the captured qcow2
//! (written by kiln) passes `qemu-img check` and holds what the guest wrote. The module
//! records the bus, so a clone's guest finds the disk on scsi again.
//!
//! `sata` needs a guest with Debian's generic kernel (the cloud kernel has no AHCI driver):
//! `build_legacy_devices.rs` builds one.

use std::process::Command;

use crate::build_common::*;
use kiln_e2e::module::{clone_run_exec, CloneExec};

/// Where the guest writes its marker on the scsi disk.
const MARKER_OFFSET: usize = 1 << 20;
const MARKER: &str = "kiln-scsi-marker";

const MANIFEST: &str = r#"vms:
  - name: buses
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 1, memory: 1Gi }
    disks:
      - { name: root, size: 4Gi }
      - { name: data, size: 64Mi, bus: scsi }
    provisioners:
      - name: write-the-scsi-disk
        type: shell
        stepTimeout: 3m
        shell:
          inline: |
            set -eu
            # The only SCSI disk: the boot disk is virtio-blk (vda).
            for _ in $(seq 60); do [ -b /dev/sda ] && break; sleep 1; done
            lsblk -o NAME,SERIAL,TRAN,SIZE
            test "$(lsblk -dno SIZE /dev/sda | tr -d ' ')" = 64M
            grep -aq data /sys/block/sda/device/vpd_pg80
            printf kiln-scsi-marker | dd of=/dev/sda bs=1M seek=1 conv=fsync status=none
"#;

#[test]
fn a_scsi_disk_is_seen_written_and_captured() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("buses.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let modules = tmp.path().join("modules");
    let out = build_into(&kiln, &manifest, &modules);
    assert!(out.status.success(), "kiln build failed");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Auto picks qemu for the scsi disk whatever the host's KVM, and says why.
    assert!(said.contains("disk `data` is on bus `scsi`"), "{said}");

    let disks = modules.join("buses/disks");
    qemu_img_check(&disks.join("buses-root.qcow2")).unwrap();
    let data = disks.join("buses-data.qcow2");
    qemu_img_check(&data).unwrap();
    let raw = tmp.path().join("data.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&data)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert: {st}");
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    assert_eq!(
        &bytes[MARKER_OFFSET..MARKER_OFFSET + MARKER.len()],
        MARKER.as_bytes(),
        "the guest's write is in the captured disk"
    );

    let yaml = std::fs::read_to_string(modules.join("buses/module.yaml")).unwrap();
    assert!(yaml.contains("bus: scsi"), "{yaml}");
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "buses",
            modules: &modules,
            clones: &tmp.path().join("clones"),
            count: None,
            vm: "buses",
            run_dir: &tmp.path().join("run"),
            env: &[],
        },
        &[
            "sh",
            "-c",
            "for _ in $(seq 60); do [ -b /dev/sda ] && break; sleep 1; done; \
             dd if=/dev/sda bs=1M skip=1 count=1 status=none | head -c 16",
        ],
    )
    .unwrap();
    assert!(exec.status.success());
    assert_eq!(String::from_utf8_lossy(&exec.stdout), MARKER);
}
