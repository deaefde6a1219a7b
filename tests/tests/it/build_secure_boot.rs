//! `kiln build` with `efiFirmware: {secureBoot: true}`: the kit's image with Debian's signed
//! shim, GRUB and kernel, served as a `url` source from loopback, builds through OVMF's Secure
//! Boot build with Microsoft's keys (cloud-init installs the agent; a shell step sees Secure
//! Boot on in the guest, a reboot, again); the module records `uefi-secure-boot` and its
//! captured NVRAM holds the Platform Key; its clone boots in `kiln run` with Secure Boot still
//! on. The same image with an unsigned loader fails fast: Secure Boot refused it.

use std::path::Path;

use crate::build_common::kiln_bin;
use crate::firmware_common::*;
use kiln_e2e::firmware_image;

const OVMF_SECURE_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const SECURE_BOOT: &str = "    efiFirmware: { secureBoot: true }\n";
/// The UEFI global variable saying whether Secure Boot is on: 4 bytes of attributes, then 1.
const SECURE_BOOT_VAR: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// A shell step failing unless the guest booted with Secure Boot on.
fn secure_boot_on(name: &str) -> String {
    format!(
        "      - name: {name}\n        type: shell\n        shell:\n          inline: |\n            set -eu\n            test \"$(od -An -t u1 {SECURE_BOOT_VAR} | awk '{{print $NF}}')\" = 1\n"
    )
}

/// The UTF-16 name of the Platform Key variable, NUL-terminated, as the variable store keeps
/// it: OVMF boots with Secure Boot silently off without it.
fn has_platform_key(store: &[u8]) -> bool {
    let pk: Vec<u8> = "PK\0"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    store.windows(pk.len()).any(|w| w == pk.as_slice())
}

#[test]
fn a_signed_image_builds_and_clones_with_secure_boot_on() {
    let steps = format!(
        "{}      - name: restart\n        type: reboot\n{}",
        secure_boot_on("secure-boot-on"),
        secure_boot_on("still-on-after-reboot")
    );
    let Some((tmp, text)) = build_image(ImageBuild {
        test: "a_signed_image_builds_and_clones_with_secure_boot_on",
        firmware_file: OVMF_SECURE_CODE,
        image: firmware_image::uefi_secure,
        module: "fw-secure",
        vm: "signed",
        extra: SECURE_BOOT,
        steps,
    }) else {
        return;
    };
    assert!(
        text.contains("signed: boot: firmware (uefi-secure-boot): efiFirmware is set"),
        "{text}"
    );
    let yaml = check_module(tmp.path(), "fw-secure", "signed", "uefi-secure-boot");
    let nvram = tmp.path().join("modules/fw-secure/nvram/signed.fd");
    assert!(
        yaml.contains("nvram: nvram/signed.fd") && yaml.contains(&sha256(&nvram)),
        "{yaml}"
    );
    assert!(
        has_platform_key(&std::fs::read(&nvram).unwrap()),
        "the captured NVRAM has no Platform Key"
    );
    // The blank plain-UEFI store has none: the check can fail.
    let plain = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
    if plain.is_file() {
        assert!(!has_platform_key(&std::fs::read(plain).unwrap()));
    }

    let kiln = kiln_bin().expect("checked by build_image");
    let var = clone_run(
        &kiln,
        tmp.path(),
        "fw-secure",
        "signed",
        &["od", "-An", "-t", "u1", SECURE_BOOT_VAR],
    );
    assert_eq!(
        var.split_whitespace().last(),
        Some("1"),
        "Secure Boot is not on in the clone: {var}"
    );
}

#[test]
fn an_unsigned_loader_under_secure_boot_fails_fast() {
    let test = "an_unsigned_loader_under_secure_boot_fails_fast";
    let Some(kiln) = prereqs(test, OVMF_SECURE_CODE) else {
        return;
    };
    if let Some(why) = firmware_image::cannot_build() {
        return kiln_e2e::skip(format_args!("{test}: {why}"));
    }
    let raw = firmware_image::uefi_unsigned().unwrap_or_else(|e| panic!("the image: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let (_server, url, sum) = serve_as_qcow2(&raw, tmp.path());
    let m = manifest(
        tmp.path(),
        "unsigned",
        "unsigned",
        (&url, &sum),
        SECURE_BOOT,
        NEVER,
    );
    fails_fast(
        test,
        &kiln,
        &m,
        tmp.path(),
        "unsigned",
        "Secure Boot refused the disk's boot loader",
    );
}

/// A `buildRef` child asking for Secure Boot over a parent module that records Secure Boot but
/// whose captured NVRAM has no keys enrolled (OVMF's blank plain variables; made by hand, no
/// build): the child inherits that NVRAM, and OVMF would boot it with Secure Boot silently
/// off, so the build refuses it before anything boots, naming the VM.
#[test]
fn a_child_inheriting_an_nvram_without_keys_is_refused_before_boot() {
    let test = "a_child_inheriting_an_nvram_without_keys_is_refused_before_boot";
    let Some(kiln) = prereqs(test, OVMF_SECURE_CODE) else {
        return;
    };
    let plain = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
    if !plain.is_file() {
        return kiln_e2e::skip(format_args!(
            "{test}: {} is missing (ovmf)",
            plain.display()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("modules/nokeys");
    std::fs::create_dir_all(module.join("disks")).unwrap();
    std::fs::create_dir_all(module.join("nvram")).unwrap();
    let disk = module.join("disks/web-root.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create");
    let nvram = module.join("nvram/web.fd");
    std::fs::copy(plain, &nvram).unwrap();
    std::fs::write(
        module.join("module.yaml"),
        format!(
            "apiVersion: kiln/v1\nkind: Module\nname: nokeys\nkilnVersion: test\nengine: qemu\nbuiltAt: 0\nbuildSeconds: 0\nvms:\n  - name: web\n    cpus: 1\n    memoryMib: 512\n    source: {{ test: hand-made }}\n    agentInImage: true\n    firmware:\n      firmware: uefi-secure-boot\n      booted: true\n      nvram: nvram/web.fd\n      nvramSha256: {}\n    disks:\n      - name: root\n        file: disks/web-root.qcow2\n        sha256: {}\n        virtualSize: {}\n        fileSize: {}\nmanifest: \"\"\n",
            sha256(&nvram),
            sha256(&disk),
            64 << 20,
            std::fs::metadata(&disk).unwrap().len(),
        ),
    )
    .unwrap();
    let m = tmp.path().join("child.yaml");
    std::fs::write(
        &m,
        format!(
            "vms:\n  - name: child\n    source:\n      buildRef: {{ name: nokeys }}\n    resources: {{ cpu: 1, memory: 512Mi }}\n    disks:\n      - name: root\n        size: 1Gi\n{SECURE_BOOT}    provisioners:\n      - name: never\n        type: shell\n        shell: {{ inline: \"true\" }}\n"
        ),
    )
    .unwrap();
    let out = build(&kiln, &m, tmp.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("VM `child`: Secure Boot is asked for")
            && err.contains("no Secure Boot keys enrolled"),
        "{err}"
    );
    // Refused as QEMU would start: no firmware ran, so it printed nothing.
    assert!(
        !err.contains("last serial console lines"),
        "nothing may boot: {err}"
    );
}
