//! Getting the agent into a guest: the cloud-init user-data fragment for NoCloud seeds,
//! and a direct install into a root file system kiln builds itself.

use std::io;
use std::path::Path;

use base64::Engine;

/// The systemd unit (started early, before the network).
pub const SYSTEMD_UNIT: &str = include_str!("../guest/kiln-agent.service");
/// The fallback for non-systemd inits (a sysv-style /etc/init.d script).
pub const INIT_SCRIPT: &str = include_str!("../guest/kiln-agent.init");

/// Where the agent lives inside a guest.
pub const GUEST_BINARY: &str = "/usr/local/bin/kiln-agent";
pub const GUEST_UNIT: &str = "/etc/systemd/system/kiln-agent.service";
pub const GUEST_INIT_SCRIPT: &str = "/etc/init.d/kiln-agent";
pub const GUEST_DEFAULTS: &str = "/etc/default/kiln-agent";
/// cloud-init writes this at the end of every boot: a guest provisioned over cloud-init is
/// ready once its user-data has run.
pub const CLOUD_INIT_DONE: &str = "/var/lib/cloud/instance/boot-finished";

/// Where the fragment takes the agent binary from.
#[derive(Debug, Clone, Copy)]
pub enum AgentSource<'a> {
    /// Embed the binary in the user-data (base64 in `write_files`): one self-contained
    /// document, about 1.33 times the binary's size.
    Embedded(&'a [u8]),
    /// Copy it from a file on the seed disk itself (the FAT volume labelled `cidata`), so
    /// the user-data stays small. `file` is the name in the volume's root.
    SeedFile { file: &'a str },
}

/// What the fragment installs.
#[derive(Debug, Clone)]
pub struct AgentInstall<'a> {
    pub source: AgentSource<'a>,
    /// Extra agent flags, written to /etc/default/kiln-agent.
    pub extra_args: Vec<String>,
    /// Report ready only after cloud-init's final stage (`--ready-when boot-finished`).
    pub wait_for_cloud_init: bool,
}

impl<'a> AgentInstall<'a> {
    pub fn embedded(binary: &'a [u8]) -> Self {
        AgentInstall {
            source: AgentSource::Embedded(binary),
            extra_args: Vec::new(),
            wait_for_cloud_init: true,
        }
    }
}

fn agent_args(i: &AgentInstall) -> String {
    let mut args = Vec::new();
    if i.wait_for_cloud_init {
        args.push(format!("--ready-when {CLOUD_INIT_DONE}"));
    }
    args.extend(i.extra_args.iter().map(|a| shell_quote(a)));
    args.join(" ")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A YAML double-quoted scalar.
fn yaml_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn literal_block(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut o = String::from("|\n");
    for line in text.lines() {
        if line.is_empty() {
            o.push('\n');
        } else {
            o.push_str(&pad);
            o.push_str(line);
            o.push('\n');
        }
    }
    o
}

/// The shell run by `runcmd`: fetch the binary (seed variant), then start the agent with
/// whatever init the guest has.
fn start_script(i: &AgentInstall) -> String {
    let mut s = String::from("set -e\n");
    if let AgentSource::SeedFile { file } = i.source {
        s.push_str(&format!(
            "dev=$(blkid -L cidata 2>/dev/null || blkid -L CIDATA 2>/dev/null || true)\n\
             [ -n \"$dev\" ] || {{ echo 'kiln: no cidata seed volume found' >&2; exit 1; }}\n\
             mnt=$(mktemp -d)\n\
             mount -o ro \"$dev\" \"$mnt\"\n\
             cp \"$mnt\"/{f} {bin}.tmp\n\
             umount \"$mnt\"; rmdir \"$mnt\"\n\
             chmod 0755 {bin}.tmp\n\
             mv {bin}.tmp {bin}\n",
            f = shell_quote(file),
            bin = GUEST_BINARY
        ));
    }
    s.push_str(&format!(
        "if [ -d /run/systemd/system ]; then\n\
         \x20 systemctl daemon-reload\n\
         \x20 systemctl enable kiln-agent.service\n\
         \x20 systemctl start --no-block kiln-agent.service\n\
         else\n\
         \x20 (update-rc.d kiln-agent defaults || rc-update add kiln-agent default || true) >/dev/null 2>&1\n\
         \x20 {GUEST_INIT_SCRIPT} start\n\
         fi\n"
    ));
    s
}

/// A `#cloud-config` document that installs and starts the agent from a NoCloud seed.
/// Combine it with a user's own user-data with [`combine_user_data`].
pub fn user_data_fragment(install: &AgentInstall) -> String {
    let mut y = String::from(
        "#cloud-config\n# kiln: install and start the kiln guest agent\nwrite_files:\n",
    );
    if let AgentSource::Embedded(bin) = install.source {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bin);
        y.push_str(&format!(
            "  - path: {GUEST_BINARY}\n    owner: root:root\n    permissions: '0755'\n    encoding: b64\n    content: {b64}\n"
        ));
    }
    y.push_str(&format!(
        "  - path: {GUEST_UNIT}\n    owner: root:root\n    permissions: '0644'\n    content: {}",
        literal_block(SYSTEMD_UNIT, 6)
    ));
    y.push_str(&format!(
        "  - path: {GUEST_INIT_SCRIPT}\n    owner: root:root\n    permissions: '0755'\n    content: {}",
        literal_block(INIT_SCRIPT, 6)
    ));
    y.push_str(&format!(
        "  - path: {GUEST_DEFAULTS}\n    owner: root:root\n    permissions: '0644'\n    content: {}\n",
        yaml_str(&format!("KILN_AGENT_ARGS={}\n", shell_quote(&agent_args(install))))
    ));
    y.push_str(&format!(
        "runcmd:\n  - [sh, -c, {}]\n",
        yaml_str(&start_script(install))
    ));
    y
}

/// How kiln's part merges into the user's cloud-config (cloud-init's `merge_how`): lists
/// appended, mappings merged. cloud-init merges cloud-config parts with "replace" by default,
/// so without it kiln's `write_files` and `runcmd` would drop the user's.
const MERGE_HOW: &str = "merge_how:\n  - name: list\n    settings: [append]\n  - name: dict\n    settings: [no_replace, recurse_list]\n";

/// A `#cloud-config` fragment that asks for its lists to be appended to the user's.
fn with_merge_how(fragment: &str) -> String {
    match fragment.strip_prefix("#cloud-config\n") {
        Some(rest) => format!("#cloud-config\n{MERGE_HOW}{rest}"),
        None => fragment.to_string(),
    }
}

/// Put the user's own user-data and the agent fragment into one MIME multipart document,
/// which cloud-init processes part by part. A `#cloud-config` fragment gets a `merge_how`
/// that appends its lists (`write_files`, `runcmd`) to the user's instead of replacing them.
/// With no user data the fragment (with its `merge_how`) is the whole document.
pub fn combine_user_data(user: Option<&str>, fragment: &str) -> String {
    let fragment = with_merge_how(fragment);
    let Some(user) = user.filter(|u| !u.trim().is_empty()) else {
        return fragment;
    };
    let boundary = "==kiln-agent-boundary-7f3c9a==";
    let part_type = |s: &str| {
        if s.starts_with("#cloud-config") {
            "text/cloud-config"
        } else if s.starts_with("#!") {
            "text/x-shellscript"
        } else {
            "text/plain"
        }
    };
    let mut o =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for (name, part) in [("user-data", user), ("kiln-agent", fragment.as_str())] {
        o.push_str(&format!(
            "--{boundary}\nContent-Type: {}; charset=\"us-ascii\"\nContent-Disposition: attachment; filename=\"{name}\"\nMIME-Version: 1.0\n\n{part}",
            part_type(part)
        ));
        if !part.ends_with('\n') {
            o.push('\n');
        }
    }
    o.push_str(&format!("--{boundary}--\n"));
    o
}

/// Install the agent into a guest root file system that kiln builds itself (bootstrap):
/// the binary, the systemd unit enabled for sysinit.target, and the init.d fallback.
pub fn install_into_root(
    root: &Path,
    agent_binary: &Path,
    extra_args: &[String],
) -> io::Result<()> {
    let rel = |p: &str| root.join(p.trim_start_matches('/'));
    let write = |p: &str, data: &[u8], mode: u32| -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dest = rel(p);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dest.with_extension("kiln-tmp");
        std::fs::write(&tmp, data)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &dest)
    };
    write(GUEST_BINARY, &std::fs::read(agent_binary)?, 0o755)?;
    write(GUEST_UNIT, SYSTEMD_UNIT.as_bytes(), 0o644)?;
    write(GUEST_INIT_SCRIPT, INIT_SCRIPT.as_bytes(), 0o755)?;
    let args: Vec<String> = extra_args.iter().map(|a| shell_quote(a)).collect();
    write(
        GUEST_DEFAULTS,
        format!("KILN_AGENT_ARGS={}\n", shell_quote(&args.join(" "))).as_bytes(),
        0o644,
    )?;
    let wants = rel("/etc/systemd/system/sysinit.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("kiln-agent.service");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(GUEST_UNIT, &link)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_fragment_carries_binary_unit_and_start() {
        let bin = b"\x7fELF fake agent \x00\xff";
        let y = user_data_fragment(&AgentInstall::embedded(bin));
        assert!(y.starts_with("#cloud-config\n"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(bin);
        assert!(y.contains(&format!("content: {b64}\n")));
        assert!(y.contains("path: /etc/systemd/system/kiln-agent.service"));
        assert!(y.contains("      ExecStart=/usr/local/bin/kiln-agent --listen vsock:1024"));
        assert!(y.contains("systemctl enable kiln-agent.service"));
        assert!(y.contains("/etc/init.d/kiln-agent start"));
        assert!(y.contains("--ready-when /var/lib/cloud/instance/boot-finished"));
        // No tabs (YAML forbids them for indentation) and every line of a block is indented.
        assert!(!y.contains('\t'));
    }

    #[test]
    fn fragment_is_valid_yaml_with_the_right_structure() {
        let bin: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let y = user_data_fragment(&AgentInstall::embedded(&bin));
        let v: serde_json::Value = serde_saphyr::from_str(&y).expect("fragment parses as YAML");
        let files = v["write_files"].as_array().expect("write_files list");
        let paths: Vec<&str> = files.iter().filter_map(|f| f["path"].as_str()).collect();
        assert_eq!(
            paths,
            [GUEST_BINARY, GUEST_UNIT, GUEST_INIT_SCRIPT, GUEST_DEFAULTS]
        );
        let b64 = files[0]["content"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, bin);
        assert_eq!(files[0]["permissions"].as_str(), Some("0755"));
        // Block scalars come back exactly as the files in guest/.
        assert_eq!(files[1]["content"].as_str(), Some(SYSTEMD_UNIT));
        assert_eq!(files[2]["content"].as_str(), Some(INIT_SCRIPT));
        assert_eq!(
            files[3]["content"].as_str(),
            Some("KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished'\n")
        );
        let run = v["runcmd"][0].as_array().expect("runcmd entry is a list");
        assert_eq!(run[0].as_str(), Some("sh"));
        assert_eq!(run[1].as_str(), Some("-c"));
        let script = run[2].as_str().unwrap();
        assert!(
            script.contains("systemctl enable kiln-agent.service"),
            "{script}"
        );
        // The start script is valid shell.
        let st = std::process::Command::new("sh")
            .args(["-n", "-c", script])
            .status()
            .unwrap();
        assert!(st.success());
    }

    #[test]
    fn init_script_is_valid_shell() {
        let st = std::process::Command::new("sh")
            .args(["-n", "-c", INIT_SCRIPT])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(SYSTEMD_UNIT.contains("ExecStart=/usr/local/bin/kiln-agent --listen vsock:1024"));
    }

    #[test]
    fn seed_fragment_copies_from_the_seed_volume() {
        let y = user_data_fragment(&AgentInstall {
            source: AgentSource::SeedFile { file: "kiln-agent" },
            extra_args: vec!["--linger-ms".into(), "500".into()],
            wait_for_cloud_init: false,
        });
        assert!(!y.contains("encoding: b64"));
        assert!(y.contains("blkid -L cidata"));
        assert!(y.contains("KILN_AGENT_ARGS='--linger-ms 500'"));
    }

    #[test]
    fn combined_user_data_is_multipart() {
        let m = combine_user_data(
            Some("#cloud-config\npackages: [nginx]\n"),
            "#cloud-config\nruncmd: []\n",
        );
        assert!(m.starts_with("Content-Type: multipart/mixed"));
        assert_eq!(m.matches("Content-Type: text/cloud-config").count(), 2);
        assert_eq!(combine_user_data(None, "x"), "x");
    }

    /// The parts of a document [`combine_user_data`] made, by filename.
    fn parts(m: &str) -> Vec<(String, String)> {
        let boundary = "--==kiln-agent-boundary-7f3c9a==";
        m.split(boundary)
            .skip(1)
            .filter(|p| !p.starts_with("--"))
            .map(|p| {
                let (head, body) = p.split_once("\n\n").expect("a MIME part has headers");
                let name = head
                    .split("filename=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .expect("a filename");
                (name.to_string(), body.to_string())
            })
            .collect()
    }

    #[test]
    fn a_users_write_files_survive_the_combine() {
        let user = "#cloud-config\nwrite_files:\n  - path: /etc/from-user\n    content: hi\nruncmd:\n  - [touch, /etc/user-ran]\n";
        let fragment = user_data_fragment(&AgentInstall {
            source: AgentSource::SeedFile { file: "kiln-agent" },
            extra_args: Vec::new(),
            wait_for_cloud_init: true,
        });
        let m = combine_user_data(Some(user), &fragment);
        let parts = parts(&m);
        assert_eq!(parts.len(), 2, "{m}");
        // The user's part comes first, byte for byte.
        assert_eq!(parts[0], ("user-data".to_string(), user.to_string()));
        let u: serde_json::Value = serde_saphyr::from_str(&parts[0].1).unwrap();
        assert_eq!(u["write_files"][0]["path"], "/etc/from-user");
        // kiln's part merges into it: its lists are appended (not cloud-init's default
        // "replace", which would drop the user's write_files and runcmd), and mappings are
        // merged without replacing the user's keys.
        assert_eq!(parts[1].0, "kiln-agent");
        let k: serde_json::Value = serde_saphyr::from_str(&parts[1].1).unwrap();
        let merge = k["merge_how"]
            .as_array()
            .expect("kiln's part has merge_how");
        let settings = |name: &str| -> Vec<&str> {
            merge
                .iter()
                .find(|m| m["name"] == name)
                .and_then(|m| m["settings"].as_array())
                .map(|s| s.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default()
        };
        assert_eq!(settings("list"), ["append"]);
        assert_eq!(settings("dict"), ["no_replace", "recurse_list"]);
        let kiln_paths: Vec<&str> = k["write_files"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["path"].as_str())
            .collect();
        assert!(kiln_paths.contains(&GUEST_UNIT), "{kiln_paths:?}");
        assert!(!kiln_paths.contains(&"/etc/from-user"));

        // Alone, the fragment is the whole document, still with its merge_how; a part that is
        // not cloud-config is left as it is.
        let alone = combine_user_data(None, &fragment);
        assert!(alone.starts_with(&format!("#cloud-config\n{MERGE_HOW}")));
        assert_eq!(alone.replacen(MERGE_HOW, "", 1), fragment);
        assert_eq!(combine_user_data(None, "#!/bin/sh\n"), "#!/bin/sh\n");
    }

    #[test]
    fn install_into_root_enables_the_unit() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("agent-bin");
        std::fs::write(&bin, b"binary").unwrap();
        let root = d.path().join("root");
        install_into_root(&root, &bin, &["--linger-ms".into(), "5".into()]).unwrap();
        assert_eq!(
            std::fs::read(root.join("usr/local/bin/kiln-agent")).unwrap(),
            b"binary"
        );
        let link = root.join("etc/systemd/system/sysinit.target.wants/kiln-agent.service");
        assert_eq!(std::fs::read_link(link).unwrap(), Path::new(GUEST_UNIT));
        assert!(root.join("etc/init.d/kiln-agent").exists());
        // Installing twice is fine.
        install_into_root(&root, &bin, &[]).unwrap();
    }
}
