//! A bootstrap base boots through kiln's minimal initramfs, and the boot still gives the
//! guest what the distro initramfs did: the NIC under its predictable name (named by udev
//! before anything brought it up), the disks' udev links, the lease handed over, Debian's
//! initrd kept in the root for boots through GRUB. The timers the recipe turns off stay off,
//! the agent's unit does not wait for the root's remount, and the generators with nothing to
//! do are skipped for the boot.

use crate::build_common::*;

const MANIFEST: &str = r#"vms:
  - name: quick
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 2, memory: 1Gi }
    disks:
      - { name: root, size: 4Gi }
    provisioners:
      - name: what-the-boot-left
        type: shell
        shell:
          inline: |
            set -eu
            ls /sys/class/net
            # udev in the initramfs named the NIC; the kernel's eth0 would mean it did not.
            ls /sys/class/net | grep -q '^en'
            ! ls /sys/class/net | grep -q '^eth'
            # ... and recorded the disks: their /dev/disk links are there for the first step.
            test -L "/dev/disk/by-uuid/$(findmnt -no UUID /)"
            # Debian's initrd stays in the root for GRUB.
            test -s /initrd.img
            test "$(systemctl is-enabled apt-daily.timer)" = disabled
            test "$(readlink /etc/systemd/system-generators/systemd-gpt-auto-generator)" = /dev/null
            # The agent started without waiting for the root's remount: the kernel command
            # line mounted it read-write already.
            findmnt -no OPTIONS / | grep -q '^rw'
            after=$(systemctl show -p After --value kiln-agent.service)
            echo "kiln-agent.service after: $after"
            case "$after" in *systemd-remount-fs*) exit 1 ;; esac
            # The initramfs skipped the generators with nothing to do, for this boot only.
            test "$(readlink /run/systemd/system-generators/systemd-sysv-generator)" = /dev/null
            test ! -e /etc/systemd/system-generators/systemd-sysv-generator
            echo boot-ok
"#;

#[test]
fn a_bootstrap_base_boots_through_the_minimal_initramfs() {
    let Some(kiln) = boot_prereqs_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (out, said) = build_text(&kiln, tmp.path(), "quick.yaml", MANIFEST);
    assert!(out.status.success(), "kiln build failed: {said}");
    assert!(said.contains("boot-ok"), "{said}");

    let module = tmp.path().join("modules/quick");
    let serial = std::fs::read_to_string(module.join("logs/quick-serial.log")).unwrap();
    // initramfs-tools says this first; kiln's /init says nothing unless it fails.
    assert!(!serial.contains("Loading, please wait"), "{serial}");
    assert!(!serial.contains("kiln initramfs:"), "{serial}");
    assert!(serial.contains("renamed from eth0"), "{serial}");
    let events = std::fs::read_to_string(module.join("logs/events.jsonl")).unwrap();
    assert!(events.contains("handed to the guest"), "{events}");
    // The module's direct-boot initrd is the base's: an uncompressed newc cpio.
    let initrd = std::fs::read(module.join("boot/quick/initrd.img")).unwrap();
    assert!(initrd.starts_with(b"070701"), "not kiln's initramfs");
}
