//! `kiln ls` and `kiln clone`: the modules a build wrote, and copy-on-write instances of them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::clone;
use crate::module;

#[derive(Debug, Args)]
pub struct LsArgs {
    /// The modules folder.
    #[arg(long, env = "KILN_MODULES", default_value = "modules")]
    pub modules: PathBuf,
    /// The clones folder.
    #[arg(long, env = "KILN_CLONES", default_value = "clones")]
    pub clones: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let mods = module::list(&a.modules)?;
    let clones = clone::list(&a.clones)?;
    if a.json {
        let v = serde_json::json!({
            "modules": mods.iter().map(|(p, r)| serde_json::json!({
                "name": r.name,
                "path": p,
                "engine": r.engine,
                "builtAt": r.built_at,
                "vms": r.vms.iter().map(|v| serde_json::json!({
                    "name": v.name,
                    "boot": boot_label(v),
                    "firmware": v.firmware,
                    "disks": v.disks.iter().map(|d| serde_json::json!({
                        "name": d.name, "file": d.file, "sha256": d.sha256,
                        "virtualSize": d.virtual_size, "fileSize": d.file_size,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "clones": clones.iter().map(|(p, c)| serde_json::json!({
                "name": c.name, "module": c.module, "path": p,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if mods.is_empty() {
        println!("no modules in {}", a.modules.display());
    } else {
        println!(
            "{:<24} {:<8} {:<24} {:<16} {:>10}",
            "MODULE", "ENGINE", "VMS", "BOOT", "SIZE"
        );
        for (_, r) in &mods {
            let vms: Vec<&str> = r.vms.iter().map(|v| v.name.as_str()).collect();
            let bytes: u64 = r
                .vms
                .iter()
                .flat_map(|v| &v.disks)
                .map(|d| d.file_size)
                .sum();
            let mut boots: Vec<String> = r.vms.iter().map(boot_label).collect();
            boots.dedup();
            println!(
                "{:<24} {:<8} {:<24} {:<16} {:>7} MiB",
                r.name,
                r.engine,
                vms.join(","),
                boots.join(","),
                bytes >> 20
            );
        }
    }
    if !clones.is_empty() {
        println!();
        println!("{:<24} {:<24}", "CLONE", "MODULE");
        for (_, c) in &clones {
            println!("{:<24} {:<24}", c.name, c.module);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The module to clone (a name in --modules, or a module folder).
    pub module: String,
    /// How many clones.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Clone name prefix (default: the module's name); clones are `<prefix>-<n>`.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, env = "KILN_MODULES", default_value = "modules")]
    pub modules: PathBuf,
    #[arg(long, env = "KILN_CLONES", default_value = "clones")]
    pub clones: PathBuf,
}

pub fn clone(a: CloneArgs) -> anyhow::Result<ExitCode> {
    let (dir, rec) = module::find(&a.modules, &a.module)?;
    // A thin module is only as good as the parent disk under it.
    module::verify_layers(&dir, &rec)?;
    let prefix = a.name.clone().unwrap_or_else(|| rec.name.clone());
    let made = clone::create(&dir, &rec, &a.clones, &prefix, a.count)
        .with_context(|| format!("cloning `{}`", rec.name))?;
    for m in made {
        println!("{}", m.display());
        // On stderr: stdout stays one clone folder a line, for scripts.
        if let Ok(c) = clone::load(&m) {
            for v in &c.vms {
                let Some(mv) = rec.vms.iter().find(|x| x.name == v.name) else {
                    continue;
                };
                let how = match &mv.firmware {
                    Some(f) if f.booted => format!("through {} firmware", f.firmware.as_str()),
                    _ => "its kernel directly".into(),
                };
                let nvram = match &v.nvram {
                    Some(n) => format!(", its own NVRAM {}", m.join(n).display()),
                    None => String::new(),
                };
                eprintln!("{}/{}: boots {how}{nvram}", c.name, v.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How a module's VM boots, as `kiln ls` and `kiln clone` show it: `direct` (its kernel,
/// loaded by kiln), the firmware it boots through (`bios`, `uefi`, `uefi-secure-boot`), or
/// `direct (uefi)` for a UEFI image its build booted directly (BIOS, every image's default,
/// goes unsaid).
pub fn boot_label(v: &module::VmRecord) -> String {
    match &v.firmware {
        Some(f) if f.booted => f.firmware.as_str().into(),
        Some(f) if f.firmware.has_nvram() => format!("direct ({})", f.firmware.as_str()),
        _ => "direct".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Firmware;
    use crate::module::{FirmwareRecord, VmRecord};

    #[test]
    fn boot_labels_name_the_firmware_a_vm_boots_through() {
        let mut v = VmRecord {
            name: "web".into(),
            cpus: 1,
            memory_mib: 256,
            source: serde_json::Value::Null,
            agent_in_image: true,
            boot: None,
            firmware: None,
            invisible: false,
            disks: vec![],
            isos: vec![],
            layers: vec![],
        };
        assert_eq!(boot_label(&v), "direct");
        for (firmware, booted, want) in [
            (Firmware::Bios, true, "bios"),
            (Firmware::Uefi, true, "uefi"),
            (Firmware::UefiSecureBoot, true, "uefi-secure-boot"),
            (Firmware::Uefi, false, "direct (uefi)"),
            (Firmware::Bios, false, "direct"),
        ] {
            v.firmware = Some(FirmwareRecord {
                firmware,
                booted,
                nvram: None,
                nvram_sha256: None,
            });
            assert_eq!(boot_label(&v), want);
        }
    }
}
