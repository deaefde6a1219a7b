//! The firmware files QEMU boots VMs through, from Debian's `seabios` and `ovmf` packages:
//! where they are on this host, and which files a [`Firmware`] needs. `kiln doctor` reports
//! the same facts.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::job::Firmware;

/// Where Debian installs them; `KILN_FIRMWARE_DIR` replaces both (one folder holding the
/// files under the same names), for hosts that keep them elsewhere.
const SEABIOS_DIR: &str = "/usr/share/seabios";
const OVMF_DIR: &str = "/usr/share/OVMF";

const SEABIOS: &str = "bios-256k.bin";
/// The 4 MiB builds: the 2 MiB ones cannot hold the Secure Boot variables.
const OVMF_CODE: &str = "OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "OVMF_VARS_4M.fd";
const OVMF_CODE_SECURE: &str = "OVMF_CODE_4M.secboot.fd";
/// Microsoft's keys enrolled, so the shims distributions sign boot.
const OVMF_VARS_MS: &str = "OVMF_VARS_4M.ms.fd";

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "{firmware} boot needs {file}, which is not installed (looked in {}; Debian package \
         `{package}`)",
        looked.display()
    )]
    Missing {
        firmware: &'static str,
        file: &'static str,
        looked: PathBuf,
        package: &'static str,
    },
}

/// The firmware files found on this host (each None when absent).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFirmware {
    pub seabios: Option<PathBuf>,
    pub ovmf_code: Option<PathBuf>,
    pub ovmf_vars: Option<PathBuf>,
    pub ovmf_code_secure_boot: Option<PathBuf>,
    pub ovmf_vars_microsoft: Option<PathBuf>,
    /// Where they were looked for.
    #[serde(skip)]
    dirs: (PathBuf, PathBuf),
}

/// What QEMU is given for one firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFiles {
    /// SeaBIOS's image, or OVMF's code (read-only flash).
    pub code: PathBuf,
    /// UEFI: the variable store each VM starts from a copy of.
    pub vars_template: Option<PathBuf>,
}

impl HostFirmware {
    pub fn find() -> Self {
        match std::env::var_os("KILN_FIRMWARE_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => Self::find_in(Path::new(&dir), Path::new(&dir)),
            None => Self::find_in(Path::new(SEABIOS_DIR), Path::new(OVMF_DIR)),
        }
    }

    pub fn find_in(seabios_dir: &Path, ovmf_dir: &Path) -> Self {
        let file = |dir: &Path, name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        HostFirmware {
            seabios: file(seabios_dir, SEABIOS),
            ovmf_code: file(ovmf_dir, OVMF_CODE),
            ovmf_vars: file(ovmf_dir, OVMF_VARS),
            ovmf_code_secure_boot: file(ovmf_dir, OVMF_CODE_SECURE),
            ovmf_vars_microsoft: file(ovmf_dir, OVMF_VARS_MS),
            dirs: (seabios_dir.to_path_buf(), ovmf_dir.to_path_buf()),
        }
    }

    /// The files `firmware` needs, or which one is missing.
    pub fn files(&self, firmware: Firmware) -> Result<FirmwareFiles, FirmwareError> {
        let need = |found: &Option<PathBuf>, file: &'static str, dir: &Path, package| {
            found.clone().ok_or_else(|| FirmwareError::Missing {
                firmware: firmware.as_str(),
                file,
                looked: dir.to_path_buf(),
                package,
            })
        };
        let (seabios_dir, ovmf_dir) = (&self.dirs.0, &self.dirs.1);
        Ok(match firmware {
            Firmware::Bios => FirmwareFiles {
                code: need(&self.seabios, SEABIOS, seabios_dir, "seabios")?,
                vars_template: None,
            },
            Firmware::Uefi => FirmwareFiles {
                code: need(&self.ovmf_code, OVMF_CODE, ovmf_dir, "ovmf")?,
                vars_template: Some(need(&self.ovmf_vars, OVMF_VARS, ovmf_dir, "ovmf")?),
            },
            Firmware::UefiSecureBoot => FirmwareFiles {
                code: need(
                    &self.ovmf_code_secure_boot,
                    OVMF_CODE_SECURE,
                    ovmf_dir,
                    "ovmf",
                )?,
                vars_template: Some(need(
                    &self.ovmf_vars_microsoft,
                    OVMF_VARS_MS,
                    ovmf_dir,
                    "ovmf",
                )?),
            },
        })
    }
}

/// Whether a UEFI variable store (an OVMF `OVMF_VARS*.fd` file, or a VM's NVRAM made from one)
/// holds a Platform Key: without one, OVMF's Secure Boot build boots anything with Secure
/// Boot off and says nothing, so a Secure Boot VM must be refused instead. Walks the store's
/// authenticated variables (EDK II's firmware volume layout); anything malformed reads as
/// "no key", and every offset is checked against the buffer.
pub fn has_platform_key(store: &[u8]) -> bool {
    const VAR_START: u16 = 0x55aa;
    /// `StartId, State, Reserved, Attributes, MonotonicCount, TimeStamp, PubKeyIndex,
    /// NameSize, DataSize, VendorGuid`.
    const VAR_HEADER: usize = 60;
    /// The store header after the volume header: a GUID, Size, Format, State, reserved.
    const STORE_HEADER: usize = 28;
    const ADDED: u8 = 0x3f;
    const ADDED_DELETING: u8 = 0x3e;
    let u16_at = |at: usize| Some(u16::from_le_bytes(store.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(store.get(at..at + 4)?.try_into().ok()?));
    let pk: Vec<u8> = "PK\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
    // The volume header names its own length (offset 0x30); `_FVH` at 0x28 marks it.
    if store.get(0x28..0x2c) != Some(b"_FVH") {
        return false;
    }
    let Some(mut at) = u16_at(0x30).map(|h| usize::from(h) + STORE_HEADER) else {
        return false;
    };
    while let (Some(VAR_START), Some(state)) = (u16_at(at), store.get(at + 2).copied()) {
        let (Some(name_len), Some(data_len)) = (u32_at(at + 36), u32_at(at + 40)) else {
            return false;
        };
        let (name_len, data_len) = (name_len as usize, data_len as usize);
        let name_at = at + VAR_HEADER;
        if matches!(state, ADDED | ADDED_DELETING)
            && store.get(name_at..name_at + name_len) == Some(pk.as_slice())
        {
            return data_len > 0;
        }
        let Some(next) = name_at
            .checked_add(name_len)
            .and_then(|n| n.checked_add(data_len))
            .map(|n| n.next_multiple_of(4))
            .filter(|n| *n > at && *n <= store.len())
        else {
            return false;
        };
        at = next;
    }
    false
}

/// The installed version of a Debian package (`dpkg-query`), None without dpkg or the package.
pub fn package_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .output()
        .ok()?;
    let v = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !v.trim().is_empty()).then(|| v.trim().to_string())
}

/// What `kiln doctor` says about the host's firmware (snake_case keys, as the probe's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirmwareReport {
    pub seabios: SeabiosReport,
    pub ovmf: OvmfReport,
    /// SeaBIOS is there: BIOS boots work.
    pub bios: bool,
    /// OVMF's code and variable store are there: `efiFirmware` boots work.
    pub uefi: bool,
    /// The secure-boot build and the Microsoft-enrolled variables are there.
    pub secure_boot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeabiosReport {
    pub path: Option<PathBuf>,
    /// `dpkg-query`'s version of `seabios`; None without dpkg or the package.
    pub package_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OvmfReport {
    pub code: Option<PathBuf>,
    pub vars: Option<PathBuf>,
    pub code_secure_boot: Option<PathBuf>,
    pub vars_microsoft: Option<PathBuf>,
    pub package_version: Option<String>,
}

impl HostFirmware {
    /// The report, with package versions from `version` ([`package_version`] outside tests).
    pub fn report(&self, version: impl Fn(&str) -> Option<String>) -> FirmwareReport {
        FirmwareReport {
            seabios: SeabiosReport {
                path: self.seabios.clone(),
                package_version: version("seabios"),
            },
            ovmf: OvmfReport {
                code: self.ovmf_code.clone(),
                vars: self.ovmf_vars.clone(),
                code_secure_boot: self.ovmf_code_secure_boot.clone(),
                vars_microsoft: self.ovmf_vars_microsoft.clone(),
                package_version: version("ovmf"),
            },
            bios: self.files(Firmware::Bios).is_ok(),
            uefi: self.files(Firmware::Uefi).is_ok(),
            secure_boot: self.files(Firmware::UefiSecureBoot).is_ok(),
        }
    }
}

impl FirmwareReport {
    /// Three lines for `kiln doctor`'s text report.
    pub fn lines(&self) -> String {
        let found = |p: &Option<PathBuf>| match p {
            Some(p) => p.display().to_string(),
            None => "missing".into(),
        };
        let version = |v: &Option<String>| match v {
            Some(v) => format!(" (package {v})"),
            None => String::new(),
        };
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        format!(
            "firmware (BIOS):   {}{}\n\
             firmware (UEFI):   code {}, vars {}{}\n\
             secure boot:       {} (code {}, Microsoft-enrolled vars {})\n",
            found(&self.seabios.path),
            version(&self.seabios.package_version),
            found(&self.ovmf.code),
            found(&self.ovmf.vars),
            version(&self.ovmf.package_version),
            yes_no(self.secure_boot),
            found(&self.ovmf.code_secure_boot),
            found(&self.ovmf.vars_microsoft),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_key_is_found_only_where_enrolled() {
        let host = HostFirmware::find();
        let (Some(plain), Some(ms)) = (&host.ovmf_vars, &host.ovmf_vars_microsoft) else {
            eprintln!("SKIP: OVMF's variable stores are not installed (Debian package ovmf)");
            return;
        };
        let ms = std::fs::read(ms).unwrap();
        assert!(has_platform_key(&ms));
        assert!(!has_platform_key(&std::fs::read(plain).unwrap()));
        // Truncated or damaged anywhere: never a panic, never a key read past the end.
        for cut in (0..ms.len()).step_by(4093) {
            has_platform_key(&ms[..cut]);
        }
        let mut bad = ms.clone();
        for at in (0x30..4096).step_by(7) {
            bad[at] ^= 0xa5;
            has_platform_key(&bad);
        }
        assert!(!has_platform_key(&[]));
    }

    #[test]
    fn files_per_firmware_and_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        for f in [SEABIOS, OVMF_CODE, OVMF_VARS] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let host = HostFirmware::find_in(dir.path(), dir.path());
        assert_eq!(
            host.files(Firmware::Bios).unwrap().code,
            dir.path().join(SEABIOS)
        );
        let uefi = host.files(Firmware::Uefi).unwrap();
        assert_eq!(uefi.code, dir.path().join(OVMF_CODE));
        assert_eq!(uefi.vars_template, Some(dir.path().join(OVMF_VARS)));
        let e = host
            .files(Firmware::UefiSecureBoot)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uefi-secure-boot boot needs OVMF_CODE_4M.secboot.fd")
                && e.contains("`ovmf`"),
            "{e}"
        );
        let r = host.report(|p| (p == "ovmf").then(|| "2022.11".to_string()));
        assert!(r.bios && r.uefi && !r.secure_boot, "{r:?}");
        assert_eq!(r.ovmf.package_version.as_deref(), Some("2022.11"));
        assert_eq!(r.seabios.package_version, None);
        assert_eq!(r.ovmf.code_secure_boot, None);
        let text = r.lines();
        assert!(
            text.contains("secure boot:       no") && text.contains("(package 2022.11)"),
            "{text}"
        );
    }
}
