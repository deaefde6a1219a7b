//! Devices for guests without virtio drivers, in a real build: VM `a` boots Debian's generic
//! kernel (`bootstrap.kernel: linux-image-amd64`; the cloud kernel has neither AHCI nor
//! e1000) with a second disk on `bus: sata` and its only NIC on `model: e1000`. The guest sees
//! the disk (AHCI, serial = the disk's name) and the NIC (`ethtool -i` says e1000), the NIC
//! gets its DHCP lease from kiln-net and reaches VM `b` (generic kernel too, its NIC an
//! `e1000e`) by name over TCP, again after a reboot (a fresh QEMU on the same NIC socket);
//! the captured disks pass `qemu-img check`, and a clone's `a` gets the e1000 NIC again (the
//! module's base.yaml keeps the model).

use crate::build_common::*;
use kiln_e2e::module::{clone_run_exec, CloneExec};

const MANIFEST: &str = r#"vms:
  - name: a
    source:
      bootstrap:
        distro: debian
        suite: bookworm
        packages: [ethtool]
        kernel: linux-image-amd64
    resources: { cpu: 1, memory: 1Gi }
    disks:
      - { name: root, size: 4Gi }
      - { name: legacy, size: 64Mi, bus: sata }
    nics:
      - { name: lan, subnet: lab, model: e1000 }
    provisioners:
      - name: check-the-devices
        type: shell
        stepTimeout: 6m
        shell:
          inline: |
            set -eu
            for _ in $(seq 60); do [ -b /dev/sda ] && break; sleep 1; done
            lsblk -o NAME,SERIAL,TRAN,SIZE
            test "$(lsblk -dno SERIAL,TRAN /dev/sda | awk '{print $1, $2}')" = "legacy sata"
            printf kiln-sata-marker | dd of=/dev/sda bs=1M seek=1 conv=fsync status=none
            nic=""
            for n in /sys/class/net/*; do
              n=${n##*/}
              if ethtool -i "$n" 2>/dev/null | grep -qx 'driver: e1000'; then nic=$n; fi
            done
            test -n "$nic"
            echo "nic $nic driver=$(ethtool -i "$nic" | sed -n 's/^driver: //p')"
            # The e1000 NIC is the VM's only one: its lease is the VM's 10.21.0.x address,
            # and the default route goes through it.
            addr=""
            for _ in $(seq 120); do
              addr=$(hostname -I | tr ' ' '\n' | grep '^10\.21\.0\.' | head -1)
              via=$(awk -v n="$nic" '$1 == n && $2 == "00000000" {print $1}' /proc/net/route)
              [ -n "$addr" ] && [ -n "$via" ] && break
              sleep 1
            done
            echo "lease $addr via $via"
            for _ in $(seq 150); do
              if getent hosts b >/tmp/b && timeout 5 bash -c 'echo > /dev/tcp/b/8080'; then
                echo "reached b at $(awk '{print $1}' /tmp/b) over $nic"
                exit 0
              fi
              sleep 2
            done
            echo "b was not reachable" >&2
            exit 1
      # A reboot is a fresh QEMU: its stream netdev connects to the same socket, and the NIC
      # keeps its switch port.
      - name: reboot
        type: reboot
      - name: after-the-reboot
        type: shell
        stepTimeout: 4m
        shell:
          inline: |
            set -eu
            for _ in $(seq 120); do
              if getent hosts b >/dev/null && timeout 5 bash -c 'echo > /dev/tcp/b/8080'; then
                echo "after the reboot: reached b from $(hostname -I)"
                exit 0
              fi
              sleep 1
            done
            exit 1
  - name: b
    source:
      bootstrap:
        distro: debian
        suite: bookworm
        packages: [busybox, ethtool]
        kernel: linux-image-amd64
    resources: { cpu: 1, memory: 1Gi }
    disks:
      - { name: root, size: 4Gi }
    nics:
      - { name: lan, subnet: lab, model: e1000e }
    provisioners:
      - name: listen
        type: shell
        shell:
          inline: |
            set -eu
            for n in /sys/class/net/*; do
              n=${n##*/}
              if ethtool -i "$n" 2>/dev/null | grep -qx 'driver: e1000e'; then
                echo "nic $n driver=e1000e"
              fi
            done
            mkdir -p /srv/www
            echo b > /srv/www/index.html
            systemd-run --unit kiln-httpd /bin/busybox httpd -f -p 8080 -h /srv/www
network:
  vpcs:
    - { name: lab, internet: false }
  subnets:
    - { name: lab, vpc: lab, cidr: 10.21.0.0/24 }
"#;

#[test]
fn a_sata_disk_and_an_e1000_nic_are_seen_leased_reach_a_peer_and_are_captured() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("legacy.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let modules = tmp.path().join("modules");
    let out = build_into(&kiln, &manifest, &modules);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kiln build failed");
    // Auto picks qemu for these devices whatever the host's KVM, and says why.
    assert!(said.contains("disk `legacy` is on bus `sata`"), "{said}");
    let nic = said
        .lines()
        .find_map(|l| l.strip_prefix("a| nic ")?.strip_suffix(" driver=e1000"))
        .expect("the guest found its e1000 NIC");
    assert!(
        said.lines()
            .any(|l| l.starts_with("a| lease 10.21.0.") && l.ends_with(&format!(" via {nic}"))),
        "no DHCP lease and default route on the e1000 NIC {nic}"
    );
    assert!(said.contains("a| reached b at 10.21.0."));
    assert!(said.contains("a| after the reboot: reached b from 10.21.0."));
    // b's NIC is an e1000e: a's frames went e1000 -> kiln-net's switch -> e1000e and back.
    assert!(said
        .lines()
        .any(|l| l.starts_with("b| nic ") && l.ends_with(" driver=e1000e")));

    let disks = modules.join("legacy/disks");
    for d in ["a-root", "a-legacy", "b-root"] {
        let path = disks.join(format!("{d}.qcow2"));
        qemu_img_check(&path).unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    let data =
        kiln_e2e::image::checked_contents(&disks.join("a-legacy.qcow2"), tmp.path()).unwrap();
    assert_eq!(
        &data[1 << 20..(1 << 20) + 16],
        b"kiln-sata-marker",
        "the guest's write through AHCI is in the captured disk"
    );
    let base = std::fs::read_to_string(modules.join("legacy/base.yaml")).unwrap();
    assert!(base.contains("model: e1000"), "{base}");

    // A clone's `a` boots with the e1000 NIC and gets a lease on its own network.
    let exec = clone_run_exec(
        &CloneExec {
            kiln: &kiln,
            module: "legacy",
            modules: &modules,
            clones: &tmp.path().join("clones"),
            count: None,
            vm: "a",
            run_dir: &tmp.path().join("run"),
            env: &[],
        },
        &[
            "sh",
            "-c",
            "for n in /sys/class/net/*; do n=${n##*/}; \
               if ethtool -i $n 2>/dev/null | grep -qx 'driver: e1000'; then nic=$n; fi; done; \
             for _ in $(seq 120); do \
               hostname -I | grep -q '10\\.21\\.0\\.' && break; sleep 1; \
             done; \
             echo \"$(ethtool -i $nic | head -1) $(hostname -I)\"",
        ],
    )
    .unwrap();
    let shown = String::from_utf8_lossy(&exec.stdout);
    assert!(exec.status.success(), "{shown}");
    assert!(
        shown.starts_with("driver: e1000 10.21.0."),
        "the clone's NIC: {shown}"
    );
    eprintln!(
        "build_legacy_devices took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
