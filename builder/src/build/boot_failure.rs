//! Boot failures told by the serial console: what SeaBIOS, OVMF, GRUB and the kernel print
//! when a VM will never boot. The build watches for them while it waits for the agent, so such
//! a VM fails at once with its cause instead of at the boot timeout (SeaBIOS retries every
//! 60 s, OVMF waits in its shell, GRUB at its prompt).

/// The cause of a boot failure in `console` (the serial output so far), if it has one.
pub(super) fn detect(console: &str) -> Option<String> {
    let lines: Vec<String> = console.lines().map(clean).collect();
    let mut load_failed: Option<&str> = None;
    for (i, line) in lines.iter().enumerate() {
        let line = line.as_str();
        // OVMF tries the disk's options first, then network boot (iPXE, then its own PXE and
        // HTTP boot: minutes of DHCP and TFTP timeouts, and nothing serves them on kiln's
        // network): network boot after a failed option means the disk has no loader the
        // firmware could start.
        let network = line.contains("Open Source Network Boot Firmware")
            || line.contains(">>Start PXE over IPv")
            || line.contains(">>Start HTTP Boot over IPv")
            || (line.contains("BdsDxe: ")
                && (line.contains("\"UEFI PXEv") || line.contains("\"UEFI HTTPv")));
        if let (Some(failed), true) = (load_failed, network) {
            return Some(format!(
                "the UEFI firmware found no boot loader on the disk (`{}`; OVMF went on to \
                 network boot)",
                failed.trim()
            ));
        }
        if line.contains("BdsDxe: failed to load Boot") {
            load_failed.get_or_insert(line);
        }
        if line.contains("No bootable device.") {
            return Some(
                "the BIOS found no bootable device (SeaBIOS: `No bootable device.`; the disk has \
                 no BIOS boot loader)"
                    .into(),
            );
        }
        if line.contains("BdsDxe: No bootable option or device was found") {
            return Some(
                "the UEFI firmware found no bootable option or device (OVMF: `BdsDxe: No \
                 bootable option or device was found`)"
                    .into(),
            );
        }
        if line.contains("BdsDxe: failed to load Boot")
            && (line.contains("Access Denied") || line.contains("Security Violation"))
        {
            return Some(format!(
                "Secure Boot refused the disk's boot loader (not signed by an enrolled key): \
                 `{}`",
                line.trim()
            ));
        }
        // Without Secure Boot OVMF falls back to its shell and waits there: only once every
        // boot option before it (the disk's) failed to load.
        if line.contains("BdsDxe: starting Boot") && line.contains("\"EFI Internal Shell\"") {
            return Some(
                "the UEFI firmware found no boot loader on the disk (no EFI system partition \
                 with EFI/BOOT/BOOTX64.EFI or a boot entry; OVMF fell back to its shell)"
                    .into(),
            );
        }
        if line.contains("grub rescue>") {
            return Some(
                "GRUB could not load its modules or configuration (`grub rescue>`)".into(),
            );
        }
        if let Some(rest) = line.trim_start().strip_prefix("error: ") {
            // GRUB prints harmless errors too (no video mode on a serial console): an error is
            // fatal when GRUB then waits for a key or at its own prompt.
            let waits = lines[i + 1..].iter().any(|l| {
                l.contains("Press any key to continue") || l.trim_start().starts_with("grub>")
            });
            if waits {
                return Some(format!("GRUB failed: `error: {}`", rest.trim()));
            }
        }
        if let Some(at) = line.find("Kernel panic - not syncing") {
            return Some(format!("the kernel panicked: `{}`", line[at..].trim()));
        }
    }
    None
}

/// A console line without terminal escape sequences and carriage returns (OVMF and SeaBIOS
/// draw their screens with them).
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters final-byte; other escapes: ESC and one character.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded: SeaBIOS 1.16.2 (`-machine graphics=off`) with an all-zero virtio disk.
    const SEABIOS_NOTHING: &str = "\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS (version \
        1.16.2-debian-1.16.2-1)\r\nBooting from Hard Disk...\r\nBoot failed: not a bootable \
        disk\r\n\r\nBooting from Floppy...\r\nBoot failed: could not read the boot disk\r\n\r\n\
        No bootable device.\r";

    /// Recorded: a kiln build (OVMF, Debian 2022.11) of an all-zero disk with a NIC: iPXE
    /// and the network options come before the shell, each waiting for DHCP and TFTP.
    const OVMF_NETWORK: &str = "\u{1b}[2J\u{1b}[01;01HBdsDxe: failed to load Boot0001 \
        \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\nBdsDxe: failed to \
        load Boot0002 \"UEFI Non-Block Boot Device\" from PciRoot(0x0)/Pci(0x2,0x0): Not \
        Found\r\n\r\n\r\n\u{1b}[1m\u{1b}[37m\u{1b}[40miPXE 1.0.0+git-20190125.36a4c85-5.1\
        \u{1b}[0m\u{1b}[37m\u{1b}[40m -- Open Source Network Boot Firmware -- \u{1b}[0m\
        \u{1b}[36m\u{1b}[40mhttp://ipxe.org\u{1b}[0m\u{1b}[37m\u{1b}[40m\r\nFeatures: DNS HTTP \
        iSCSI NFS TFTP AoE EFI Menu\r\n";

    /// Recorded: OVMF (Debian 2022.11) with an all-zero virtio disk, no Secure Boot.
    const OVMF_SHELL: &str = "\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h\u{1b}[2J\u{1b}[01;01HBdsDxe: \
        failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0): Not \
        Found\r\nBdsDxe: loading Boot0002 \"EFI Internal Shell\" from \
        Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1)\r\n\
        BdsDxe: starting Boot0002 \"EFI Internal Shell\" from \
        Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1)\r\n\
        \u{1b}[2J\u{1b}[01;01H\u{1b}[01;01HUEFI Interactive Shell v2.2\r\n";

    #[test]
    fn seabios_without_a_boot_sector() {
        let why = detect(SEABIOS_NOTHING).unwrap();
        assert!(why.contains("no bootable device"), "{why}");
        // Before SeaBIOS gives up, nothing is a failure yet.
        let head = &SEABIOS_NOTHING[..SEABIOS_NOTHING.find("Booting from Floppy").unwrap()];
        assert_eq!(detect(head), None);
    }

    #[test]
    fn ovmf_without_a_loader_falls_back_to_its_shell() {
        let why = detect(OVMF_SHELL).unwrap();
        assert!(why.contains("no boot loader on the disk"), "{why}");
        // Loading the shell is not yet starting it.
        let head = &OVMF_SHELL[..OVMF_SHELL.find("BdsDxe: starting").unwrap()];
        assert_eq!(detect(head), None);
    }

    #[test]
    fn ovmf_going_on_to_network_boot_after_the_disk_failed() {
        let why = detect(OVMF_NETWORK).unwrap();
        assert!(
            why.contains("no boot loader on the disk") && why.contains("Boot0001"),
            "{why}"
        );
        // Network boot alone (nothing failed before it) is not a failure.
        let alone = &OVMF_NETWORK[OVMF_NETWORK.find("\r\n\r\n").unwrap()..];
        assert_eq!(detect(alone), None);
        let later = "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from \
                     PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\nNothing to boot\r\nBdsDxe: failed to \
                     load Boot0003 \"UEFI PXEv4 (MAC:026B6C322997)\" from PciRoot(0x0)/Pci(0x4,0x0)/\
                     MAC(026B6C322997,0x1): Not Found\r\n\r\n>>Start PXE over IPv4.\r\n";
        assert!(detect(later).unwrap().contains("Boot0001"));
    }

    #[test]
    fn ovmf_with_nothing_left_and_secure_boot_refusals() {
        let nothing = "BdsDxe: No bootable option or device was found.\r\n\
                       BdsDxe: Press any key to enter the Boot Manager Menu.\r\n";
        assert!(detect(nothing)
            .unwrap()
            .contains("no bootable option or device"));
        for refusal in ["Access Denied", "Security Violation"] {
            let text = format!(
                "BdsDxe: loading Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)\r\n\
                 BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from \
                 PciRoot(0x0)/Pci(0x2,0x0): {refusal}\r\n"
            );
            let why = detect(&text).unwrap();
            assert!(
                why.contains("Secure Boot refused") && why.contains(refusal),
                "{why}"
            );
        }
    }

    /// Recorded: OVMF's Secure Boot build with the MS-enrolled variables (Debian 2022.11)
    /// booting the kit's image with an unsigned loader; the shell is refused too, then nothing
    /// is left (the shell's path elided as the recording had it).
    const OVMF_SECURE_BOOT_REFUSED: &str = "BdsDxe: failed to load Boot0001 \"UEFI Misc \
        Device\" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied\r\nBdsDxe: failed to start \
        Boot0002 \"EFI Internal Shell\" ...: Security Violation\r\nBdsDxe: No bootable option \
        or device was found.\r\n";

    #[test]
    fn the_recorded_secure_boot_refusal_names_the_loader_not_the_empty_disk() {
        let why = detect(OVMF_SECURE_BOOT_REFUSED).unwrap();
        assert!(
            why.contains("Secure Boot refused the disk's boot loader")
                && why.contains("Boot0001 \"UEFI Misc Device\"")
                && why.contains("Access Denied"),
            "{why}"
        );
        // The first line alone already tells it: the build fails before OVMF gives up.
        let first = &OVMF_SECURE_BOOT_REFUSED[..OVMF_SECURE_BOOT_REFUSED.find("\r\n").unwrap()];
        assert_eq!(detect(first), Some(why));
    }

    #[test]
    fn grub_failures_but_not_its_harmless_errors() {
        assert!(
            detect("error: unknown filesystem.\r\nEntering rescue mode...\r\ngrub rescue> ")
                .unwrap()
                .contains("grub rescue>")
        );
        let menu =
            "Booting `Debian GNU/Linux'\r\n\r\nerror: file `/boot/vmlinuz-6.1.0-28-cloud-amd64' \
                    not found.\r\n\r\nPress any key to continue...";
        let why = detect(menu).unwrap();
        assert!(
            why.contains("GRUB failed") && why.contains("not found"),
            "{why}"
        );
        // Printed on many good UEFI boots, then the kernel starts.
        let harmless = "error: no suitable video mode found.\r\nBooting in blind mode\r\n\
                        [    0.000000] Linux version 6.1.0-28-cloud-amd64\r\n";
        assert_eq!(detect(harmless), None);
    }

    #[test]
    fn a_kernel_panic() {
        let text = "[    2.101] VFS: Cannot open root device \"vda1\"\r\n[    2.102] Kernel \
                    panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n";
        let why = detect(text).unwrap();
        assert!(
            why.starts_with("the kernel panicked: `Kernel panic - not syncing: VFS"),
            "{why}"
        );
    }

    #[test]
    fn a_normal_boot_is_not_a_failure() {
        let text = "SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n\
                    Welcome to GRUB!\r\n[    0.000000] Linux version 6.1.0\r\n\
                    [  OK  ] Reached target Multi-User System.\r\n";
        assert_eq!(detect(text), None);
    }
}
