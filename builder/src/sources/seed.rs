//! The cloud-init NoCloud seed for images that do not carry kiln's agent (`url` and `file`
//! sources with a `cloudInit` key): a small FAT volume labelled `cidata` holding `user-data`,
//! `meta-data`, `network-config` when the manifest gives one, and the static agent binary.
//!
//! The user-data is a MIME multipart document: the manifest's own `userData` first, then
//! kiln-agent's fragment (`kiln_agent::cloud_init`), which writes the agent's systemd unit and
//! copies the binary from this same volume. The binary travels as a file on the volume rather
//! than base64 inside the user-data so cloud-init's YAML parser (pure Python, slow under TCG)
//! reads a few kilobytes instead of two megabytes.
//!
//! The agent reports ready only after cloud-init's final stage (`--ready-when
//! boot-finished`), so the user's own cloud-config has run before the first step.

use std::path::{Path, PathBuf};

use crate::cache::sha256_bytes;
use crate::job::{CloudInit, VmJob};

/// The agent binary's name in the seed volume's root.
pub const AGENT_FILE: &str = "kiln-agent";
/// The file-system label cloud-init's NoCloud data source looks for.
pub const LABEL: &str = "cidata";

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(
        "kiln's agent is not in this image and the VM has no `cloudInit` key to install it \
         through a NoCloud seed (add `cloudInit: {{}}` to the VM)"
    )]
    NoCloudInit,
    #[error("reading the agent binary {path}: {source}")]
    Agent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Locate(#[from] super::bootstrap::BootstrapError),
    #[error("writing the cloud-init seed {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// What goes on the seed volume, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub user_data: String,
    pub meta_data: String,
    pub network_config: Option<String>,
}

/// The seed's documents for a VM. `instance-id` is derived from the VM's name and the
/// user-data, so a rebuild of the same manifest gives the same seed (reproducible), and a
/// changed user-data is a new instance to cloud-init.
pub fn files(vm: &str, ci: &CloudInit) -> SeedFiles {
    let fragment =
        kiln_agent::cloud_init::user_data_fragment(&kiln_agent::cloud_init::AgentInstall {
            source: kiln_agent::cloud_init::AgentSource::SeedFile { file: AGENT_FILE },
            extra_args: Vec::new(),
            wait_for_cloud_init: true,
        });
    // The combine gives kiln's part a `merge_how`, so the user's `write_files` and `runcmd`
    // are kept (cloud-init would otherwise replace them).
    let user_data = kiln_agent::cloud_init::combine_user_data(ci.user_data.as_deref(), &fragment);
    let digest = sha256_bytes(format!("{vm}\n{user_data}").as_bytes());
    // meta-data is YAML; the VM name is a DNS label, so it needs no quoting.
    let meta_data = format!(
        "instance-id: kiln-{vm}-{}\nlocal-hostname: {vm}\n",
        &digest[..16]
    );
    SeedFiles {
        user_data,
        meta_data,
        network_config: ci.network_data.clone(),
    }
}

/// Writes the seed volume for `vm` at `out` (atomically), with the agent binary at
/// `agent_binary`.
pub fn write(
    out: &Path,
    vm: &str,
    ci: &CloudInit,
    agent_binary: &Path,
) -> Result<SeedFiles, SeedError> {
    let f = files(vm, ci);
    let agent = std::fs::read(agent_binary).map_err(|source| SeedError::Agent {
        path: agent_binary.to_path_buf(),
        source,
    })?;
    let mut entries = vec![
        kiln_disk::FatFile::new("user-data", f.user_data.as_bytes()),
        kiln_disk::FatFile::new("meta-data", f.meta_data.as_bytes()),
    ];
    if let Some(n) = &f.network_config {
        entries.push(kiln_disk::FatFile::new("network-config", n.as_bytes()));
    }
    entries.push(kiln_disk::FatFile::new(AGENT_FILE, agent));
    kiln_disk::create_fat_image(out, LABEL, &entries).map_err(|e| SeedError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(f)
}

/// The seed a VM needs, if any: none when the agent is already in the image or the steps go
/// over SSH; a seed written to `<work>/<vm>-cidata.img` when the VM has a `cloudInit` key; an
/// error otherwise.
pub fn prepare(
    vm: &VmJob,
    agent_in_image: bool,
    work: &Path,
) -> Result<Option<PathBuf>, SeedError> {
    if agent_in_image || matches!(vm.communicator, crate::job::CommunicatorJob::Ssh(_)) {
        return Ok(None);
    }
    let Some(ci) = &vm.cloud_init else {
        return Err(SeedError::NoCloudInit);
    };
    let agent = super::bootstrap::AgentFiles::locate()?;
    let out = work.join(format!("{}-cidata.img", vm.name));
    write(&out, &vm.name, ci, &agent.binary)?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ci(user: Option<&str>, net: Option<&str>) -> CloudInit {
        CloudInit {
            user_data: user.map(str::to_string),
            network_data: net.map(str::to_string),
        }
    }

    #[test]
    fn user_data_merges_the_users_part_and_the_agent_fragment() {
        let f = files(
            "web",
            &ci(
                Some("#cloud-config\nruncmd:\n  - [touch, /etc/from-user]\n"),
                None,
            ),
        );
        assert!(f.user_data.starts_with("Content-Type: multipart/mixed"));
        let user_at = f.user_data.find("/etc/from-user").unwrap();
        let agent_at = f.user_data.find("blkid -L cidata").unwrap();
        assert!(user_at < agent_at, "the user's part comes first");
        assert!(f
            .user_data
            .contains("--ready-when /var/lib/cloud/instance/boot-finished"));
        // kiln's part appends to the user's lists instead of replacing them.
        let kiln_part = &f.user_data[f.user_data.find("filename=\"kiln-agent\"").unwrap()..];
        assert!(kiln_part.contains("merge_how:\n  - name: list\n    settings: [append]\n"));
        // The binary is a file on the volume, not inline base64.
        assert!(!f.user_data.contains("encoding: b64"));
        assert!(f.meta_data.starts_with("instance-id: kiln-web-"));
        assert!(f.meta_data.contains("local-hostname: web\n"));
        assert_eq!(f.network_config, None);
    }

    #[test]
    fn empty_cloud_init_gives_the_fragment_alone_and_a_stable_instance_id() {
        let a = files("db", &ci(None, Some("version: 2\n")));
        assert!(a.user_data.starts_with("#cloud-config\n"));
        let v: serde_json::Value = serde_saphyr::from_str(&a.user_data).expect("valid YAML");
        assert_eq!(v["merge_how"][0]["name"], "list");
        assert_eq!(v["merge_how"][0]["settings"][0], "append");
        let paths: Vec<&str> = v["write_files"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["path"].as_str())
            .collect();
        assert!(
            paths.contains(&kiln_agent::cloud_init::GUEST_UNIT),
            "{paths:?}"
        );
        assert_eq!(a.network_config.as_deref(), Some("version: 2\n"));
        assert_eq!(a, files("db", &ci(None, Some("version: 2\n"))));
        let b = files("db", &ci(Some("#!/bin/sh\necho hi\n"), None));
        assert_ne!(a.meta_data, b.meta_data, "new user-data, new instance");
        assert!(b.user_data.contains("Content-Type: text/x-shellscript"));
    }

    #[test]
    fn seed_volume_holds_the_documents_and_the_agent() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        // The size of the real static agent (a few MiB): past what 512-byte FAT12 clusters hold.
        let bin: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&agent, &bin).unwrap();
        let out = d.path().join("seed.img");
        let f = write(&out, "web", &ci(None, Some("version: 2\n")), &agent).unwrap();
        let img = std::fs::read(&out).unwrap();
        // A FAT boot sector, with the volume label cloud-init looks for (either case).
        assert_eq!(&img[510..512], &[0x55, 0xAA]);
        let upper = String::from_utf8_lossy(&img).to_ascii_uppercase();
        assert!(upper.contains("CIDATA"));
        // The files' contents are in the image (FAT stores them contiguously when fresh).
        let find = |needle: &[u8]| img.windows(needle.len()).any(|w| w == needle);
        assert!(find(f.meta_data.as_bytes()));
        assert!(find(f.user_data.as_bytes()));
        assert!(find(&bin[..4096]));
        // Read back with mtools-free tooling when present: fsck.vfat checks the volume.
        if let Ok(o) = std::process::Command::new("fsck.vfat")
            .args(["-n"])
            .arg(&out)
            .output()
        {
            assert!(
                o.status.success(),
                "fsck.vfat: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        } else {
            eprintln!("note: fsck.vfat (dosfstools) not installed; volume not fsck'd");
        }
    }

    #[test]
    fn missing_agent_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = write(
            &d.path().join("s.img"),
            "web",
            &ci(None, None),
            &d.path().join("nope"),
        )
        .unwrap_err();
        assert!(matches!(e, SeedError::Agent { .. }), "{e}");
        assert!(!d.path().join("s.img").exists());
    }
}
