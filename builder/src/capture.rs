//! Capture: make the guest a template (unless the manifest opts out), power it off through
//! the agent, wait for the engine to end, then write each disk as a standalone compressed
//! qcow2.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::engine::RunningVm;
use crate::guest::{Guest, GuestCommand, GuestError};
use crate::module::DiskRecord;
use crate::sources::ParentDisk;

/// What must not be in a template: identity (machine-id, SSH host keys), cloud-init's
/// per-instance state, logs, and kiln's own traces. Free blocks are trimmed so the capture
/// compresses well. SSH host keys are regenerated at first boot by a small unit.
pub const TEMPLATE_CLEANUP: &str = r#"set +e
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
if [ -d /etc/ssh ]; then
  rm -f /etc/ssh/ssh_host_*
  cat > /etc/systemd/system/kiln-ssh-hostkeys.service <<'EOF'
[Unit]
Description=kiln: generate SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
  mkdir -p /etc/systemd/system/multi-user.target.wants
  ln -sf /etc/systemd/system/kiln-ssh-hostkeys.service /etc/systemd/system/multi-user.target.wants/
fi
rm -rf /var/lib/cloud/instances /var/lib/cloud/instance /var/lib/cloud/data /var/lib/cloud/sem
rm -rf /var/log/journal/* /root/.bash_history /tmp/kiln-* /var/tmp/kiln-* /var/log/kiln-agent* /var/lib/kiln-agent
# Each program started under TCG costs a good part of a second: empty the logs and apt's
# caches (what `apt-get clean` removes) with shell builtins and one rm.
shopt -s globstar nullglob dotglob
for f in /var/log/**; do [ -f "$f" ] && [ -s "$f" ] && : > "$f"; done
rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/* /var/cache/apt/*.bin
# Blocks freed above become trimmable once the journal commits them.
sync
command -v fstrim >/dev/null && fstrim -a 2>/dev/null
exit 0
"#;

/// Runs before every power-off, template or not. An agent installed through a cloud-init
/// seed waits for cloud-init's `boot-finished` before it reports ready; clones boot without
/// a seed, so cloud-init never finishes there and the agent would never answer. The captured
/// disk's agent therefore reports ready as soon as it runs, like a bootstrapped one.
pub const AGENT_FOR_CLONES: &str = r#"f=/etc/default/kiln-agent
if [ -f "$f" ] && grep -q -- '--ready-when /var/lib/cloud/instance/boot-finished' "$f"; then
  sed -i 's# *--ready-when /var/lib/cloud/instance/boot-finished##' "$f"
fi
exit 0
"#;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("template cleanup: {0}")]
    Cleanup(GuestError),
    #[error("power-off: {0}")]
    Poweroff(GuestError),
    #[error(
        "the VM did not power off within {0:?}; it was stopped and its disks are not captured"
    )]
    NoPoweroff(Duration),
    #[error("waiting for the VM: {0}")]
    Wait(std::io::Error),
    #[error("writing {disk}: {reason}")]
    Write { disk: String, reason: String },
}

/// Runs the cleanup (unless `clean` is false) and powers the guest off; returns once the
/// engine has ended.
pub fn shutdown(
    mut guest: Box<dyn Guest>,
    vm: &std::sync::Mutex<Box<dyn RunningVm>>,
    clean: bool,
    timeout: Duration,
) -> Result<(), CaptureError> {
    if clean {
        let st = guest
            .exec(
                &GuestCommand::Bash(TEMPLATE_CLEANUP.into()),
                &BTreeMap::new(),
                Some(Duration::from_secs(300)),
                &mut |_, _| {},
            )
            .map_err(CaptureError::Cleanup)?;
        if !st.success() {
            return Err(CaptureError::Cleanup(GuestError::Agent(format!(
                "cleanup script: {st}"
            ))));
        }
    }
    let st = guest
        .exec(
            &GuestCommand::Bash(AGENT_FOR_CLONES.into()),
            &BTreeMap::new(),
            Some(Duration::from_secs(60)),
            &mut |_, _| {},
        )
        .map_err(CaptureError::Cleanup)?;
    if !st.success() {
        return Err(CaptureError::Cleanup(GuestError::Agent(format!(
            "agent settings for clones: {st}"
        ))));
    }
    // After the cleanup no service has anything to save (a graceful stop would write a
    // random seed, utmp and journal entries back into the template), so init stops none.
    if clean {
        guest.poweroff_now()
    } else {
        guest.poweroff()
    }
    .map_err(CaptureError::Poweroff)?;
    drop(guest);
    // Wait in short slices so a cancel (which locks the VM to kill it) is never held up.
    let start = std::time::Instant::now();
    loop {
        let mut v = vm.lock().unwrap_or_else(|p| p.into_inner());
        if v.wait_exit(Duration::from_millis(200))
            .map_err(CaptureError::Wait)?
            .is_some()
        {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            v.kill();
            return Err(CaptureError::NoPoweroff(timeout));
        }
        drop(v);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Captures one of a VM's disks into the module being written at `module_dir` (which becomes
/// `final_dir`), as `disks/<vm>-<disk>.qcow2`: a standalone compressed qcow2, or with
/// `thin_over` a compressed layer holding only what the VM changed over that parent disk,
/// whose backing name is relative (from `final_dir/disks` to the parent), so a folder of
/// modules can move as a whole.
pub fn capture_to_module(
    module_dir: &Path,
    final_dir: &Path,
    vm: &str,
    disk: &str,
    overlay: &Path,
    thin_over: Option<&ParentDisk>,
) -> Result<DiskRecord, CaptureError> {
    let rel = format!("disks/{vm}-{disk}.qcow2");
    let out = module_dir.join(&rel);
    let e = |reason: String| CaptureError::Write {
        disk: out.display().to_string(),
        reason,
    };
    let (_, virtual_size) = crate::diskops::probe(overlay).map_err(|x| e(x.to_string()))?;
    let (sha256, backing) = match thin_over {
        None => (capture_disk(overlay, &out)?, None),
        Some(p) => {
            let parent = std::fs::canonicalize(&p.path).map_err(|x| {
                e(format!(
                    "resolving the parent disk {}: {x}",
                    p.path.display()
                ))
            })?;
            let modules = final_dir.parent().filter(|d| !d.as_os_str().is_empty());
            let modules = std::fs::canonicalize(modules.unwrap_or(Path::new(".")))
                .map_err(|x| e(format!("resolving the modules folder: {x}")))?;
            let name = final_dir
                .file_name()
                .ok_or_else(|| e("the module folder has no name".into()))?;
            let from = modules.join(name).join("disks");
            let backing = crate::diskops::relative_path(&from, &parent);
            let backing = backing
                .to_str()
                .ok_or_else(|| e(format!("{} is not UTF-8", backing.display())))?
                .to_string();
            let st = crate::diskops::capture_thin(overlay, &parent, &backing, &out)
                .map_err(|x| e(x.to_string()))?;
            tracing::info!(
                vm,
                disk,
                changed = st.changed_clusters,
                unchanged = st.same_clusters,
                "thin capture over {}",
                parent.display()
            );
            let sha = crate::cache::sha256_file(&out).map_err(|x| e(x.to_string()))?;
            (sha, Some((backing, p)))
        }
    };
    let file_size = std::fs::metadata(&out)
        .map(|m| m.len())
        .map_err(|x| e(x.to_string()))?;
    Ok(DiskRecord {
        name: disk.to_string(),
        file: rel,
        sha256,
        virtual_size,
        file_size,
        backing_sha256: backing.as_ref().map(|(_, p)| p.sha256.clone()),
        backing_module: backing.as_ref().map(|(_, p)| p.module.clone()),
        backing: backing.map(|(b, _)| b),
    })
}

/// Writes the chain under `overlay` as a standalone compressed qcow2 at `out`; returns its
/// SHA-256.
pub fn capture_disk(overlay: &Path, out: &Path) -> Result<String, CaptureError> {
    let e = |reason: String| CaptureError::Write {
        disk: out.display().to_string(),
        reason,
    };
    crate::diskops::capture_compressed(overlay, out).map_err(|x| e(x.to_string()))?;
    crate::cache::sha256_file(out).map_err(|x| e(x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::tests::{FakeGuest, FakeState};
    use std::process::ExitStatus;
    use std::sync::{Arc, Mutex};

    struct FakeVm {
        state: Arc<Mutex<FakeState>>,
        killed: bool,
    }

    impl RunningVm for FakeVm {
        fn vsock_socket(&self) -> &Path {
            Path::new("/nonexistent")
        }
        fn wait_exit(&mut self, _t: Duration) -> std::io::Result<Option<ExitStatus>> {
            use std::os::unix::process::ExitStatusExt;
            Ok(self
                .state
                .lock()
                .unwrap()
                .powered_off
                .then(|| ExitStatus::from_raw(0)))
        }
        fn is_running(&mut self) -> bool {
            !self.state.lock().unwrap().powered_off
        }
        fn kill(&mut self) {
            self.killed = true;
        }
        fn pids(&self) -> Vec<u32> {
            vec![]
        }
    }

    #[test]
    fn agent_settings_for_clones_drop_the_cloud_init_wait() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("kiln-agent");
        let run = |content: &str| -> String {
            std::fs::write(&f, content).unwrap();
            let script = AGENT_FOR_CLONES.replace("/etc/default/kiln-agent", f.to_str().unwrap());
            let st = std::process::Command::new("sh")
                .args(["-c", &script])
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read_to_string(&f).unwrap()
        };
        // What kiln-agent's seed fragment writes.
        assert_eq!(
            run("KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished'\n"),
            "KILN_AGENT_ARGS=''\n"
        );
        assert_eq!(
            run("KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished --linger-ms 5'\n"),
            "KILN_AGENT_ARGS=' --linger-ms 5'\n"
        );
        // A bootstrapped image's settings are left alone.
        assert_eq!(run("KILN_AGENT_ARGS=''\n"), "KILN_AGENT_ARGS=''\n");
    }

    #[test]
    fn cleanup_then_poweroff() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let vm: std::sync::Mutex<Box<dyn RunningVm>> = std::sync::Mutex::new(Box::new(FakeVm {
            state: state.clone(),
            killed: false,
        }));
        shutdown(
            Box::new(FakeGuest(state.clone())),
            &vm,
            true,
            Duration::from_secs(1),
        )
        .unwrap();
        let s = state.lock().unwrap();
        assert!(s.powered_off);
        assert!(matches!(&s.commands[0].0, GuestCommand::Bash(b) if b.contains("machine-id")));
    }

    #[test]
    fn opt_out_skips_cleanup() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let vm: std::sync::Mutex<Box<dyn RunningVm>> = std::sync::Mutex::new(Box::new(FakeVm {
            state: state.clone(),
            killed: false,
        }));
        shutdown(
            Box::new(FakeGuest(state.clone())),
            &vm,
            false,
            Duration::from_secs(1),
        )
        .unwrap();
        // Only the agent's settings for clones; no template cleanup.
        let s = state.lock().unwrap();
        assert_eq!(s.commands.len(), 1);
        assert!(matches!(&s.commands[0].0, GuestCommand::Bash(b) if b == AGENT_FOR_CLONES));
        assert!(s.powered_off);
    }
}
