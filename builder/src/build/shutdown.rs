//! Shutdown: make the guest a template (unless the manifest opts out), power it off through
//! the agent and wait for the engine to end, so its disks can be captured.

use std::collections::BTreeMap;
use std::time::Duration;

use super::boot::Launched;
use super::error::{ShutdownError, VmError};
use super::vm::VmBuild;
use crate::engine::RunningVm;
use crate::events::VmPhase;
use crate::guest::{
    CleanupAction, CleanupOutcome, CleanupPlan, Connector, Guest, GuestCommand, GuestError,
};

/// The first-boot unit that regenerates SSH host keys; [`TEMPLATE_CLEANUP`] writes the same
/// text (a test checks they agree).
pub const SSH_HOSTKEYS_UNIT: &str = "[Unit]
Description=kiln: generate SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";
const SSH_HOSTKEYS_UNIT_PATH: &str = "/etc/systemd/system/kiln-ssh-hostkeys.service";

/// [`TEMPLATE_CLEANUP`] as a plan the agent carries out itself: the same paths and effects,
/// without the dozen program starts (about 6 s under TCG). Differences, all harmless for a
/// template: `/etc/ssh` only needs to exist (the script tests for a directory); globs also
/// match dotfiles (the script's `/var/log/journal/*` did not); files under /var/log are
/// emptied without following symlinks or crossing into other file systems.
pub fn template_plan() -> CleanupPlan {
    let rm = |p: &str| CleanupAction::Remove(p.into());
    let mut actions = vec![
        CleanupAction::Truncate("/etc/machine-id".into()),
        // D-Bus's id is the machine's (what Debian's tmpfiles.d makes at boot), so a clone's
        // follows its own; removed, a boot still settling could make it after the cleanup.
        CleanupAction::IfExists {
            path: "/var/lib/dbus".into(),
            then: vec![CleanupAction::Symlink {
                target: "/etc/machine-id".into(),
                link: "/var/lib/dbus/machine-id".into(),
            }],
        },
        CleanupAction::IfExists {
            path: "/etc/ssh".into(),
            then: vec![
                rm("/etc/ssh/ssh_host_*"),
                CleanupAction::WriteFile {
                    path: SSH_HOSTKEYS_UNIT_PATH.into(),
                    mode: 0o644,
                    data: SSH_HOSTKEYS_UNIT.as_bytes().to_vec(),
                },
                CleanupAction::Symlink {
                    target: SSH_HOSTKEYS_UNIT_PATH.into(),
                    link: "/etc/systemd/system/multi-user.target.wants/kiln-ssh-hostkeys.service"
                        .into(),
                },
            ],
        },
    ];
    for p in [
        "/var/lib/cloud/instances",
        "/var/lib/cloud/instance",
        "/var/lib/cloud/data",
        "/var/lib/cloud/sem",
        "/var/log/journal/*",
        "/root/.bash_history",
        "/tmp/kiln-*",
        "/var/tmp/kiln-*",
        "/var/log/kiln-agent*",
        "/var/lib/kiln-agent",
    ] {
        actions.push(rm(p));
    }
    actions.push(CleanupAction::EmptyFilesUnder("/var/log".into()));
    for p in [
        "/var/cache/apt/archives/*.deb",
        "/var/cache/apt/archives/partial/*",
        "/var/cache/apt/*.bin",
    ] {
        actions.push(rm(p));
    }
    // Blocks freed above become trimmable once the journal commits them.
    actions.push(CleanupAction::Sync);
    actions.push(CleanupAction::TrimAll);
    CleanupPlan { actions }
}

/// What must not be in a template: identity (machine-id, SSH host keys), cloud-init's
/// per-instance state, logs, and kiln's own traces. Free blocks are trimmed so the capture
/// compresses well. SSH host keys are regenerated at first boot by a small unit.
pub const TEMPLATE_CLEANUP: &str = r#"set +e
truncate -s 0 /etc/machine-id
if [ -d /var/lib/dbus ]; then ln -sfn /etc/machine-id /var/lib/dbus/machine-id; fi
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

/// The agent's settings file that [`AGENT_FOR_CLONES`] edits.
const AGENT_DEFAULTS: &str = "/etc/default/kiln-agent";
const CLOUD_INIT_WAIT: &[u8] = b"--ready-when /var/lib/cloud/instance/boot-finished";

/// [`AGENT_FOR_CLONES`]'s sed, done in kiln: on each line, the first
/// `--ready-when /var/lib/cloud/instance/boot-finished` and the spaces before it are cut.
/// None when nothing changes.
pub fn drop_cloud_init_wait(content: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(content.len());
    let mut changed = false;
    for line in content.split_inclusive(|&b| b == b'\n') {
        match line
            .windows(CLOUD_INIT_WAIT.len())
            .position(|w| w == CLOUD_INIT_WAIT)
        {
            Some(at) => {
                let start = line[..at]
                    .iter()
                    .rposition(|&b| b != b' ')
                    .map_or(0, |i| i + 1);
                out.extend_from_slice(&line[..start]);
                out.extend_from_slice(&line[at + CLOUD_INIT_WAIT.len()..]);
                changed = true;
            }
            None => out.extend_from_slice(line),
        }
    }
    changed.then_some(out)
}

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

fn run_script(
    guest: &mut dyn Guest,
    body: &str,
    timeout_secs: u64,
    what: &str,
) -> Result<(), ShutdownError> {
    let st = guest
        .exec(
            &GuestCommand::Bash(body.into()),
            &BTreeMap::new(),
            Some(Duration::from_secs(timeout_secs)),
            &mut |_, _| {},
        )
        .map_err(ShutdownError::Cleanup)?;
    if !st.success() {
        return Err(ShutdownError::Cleanup(GuestError::Agent(format!(
            "{what}: {st}"
        ))));
    }
    Ok(())
}

/// [`AGENT_FOR_CLONES`] without a process: read the settings with get-file, edit them here,
/// write them back with put-file (both requests every agent knows). A guest that cannot
/// read files gets the script.
fn agent_for_clones(guest: &mut dyn Guest) -> Result<(), ShutdownError> {
    match guest.read_file(AGENT_DEFAULTS, 64 * 1024) {
        Ok(None) => Ok(()),
        Ok(Some((content, mode))) => match drop_cloud_init_wait(&content) {
            Some(edited) => guest
                .put_file(AGENT_DEFAULTS, &edited, mode)
                .map_err(ShutdownError::Cleanup),
            None => Ok(()),
        },
        Err(GuestError::NotAvailable(_)) => {
            run_script(guest, AGENT_FOR_CLONES, 60, "agent settings for clones")
        }
        Err(e) => Err(ShutdownError::Cleanup(e)),
    }
}

/// Runs the cleanup (unless `clean` is false) and powers the guest off; returns once the
/// engine has ended. The cleanup is a plan the agent carries out itself; an agent older than
/// that request (a `buildRef` parent's disk carries the agent it was built with) closes the
/// session, and then `connector` opens a new one for the scripts, as before.
pub fn shutdown(
    mut guest: Box<dyn Guest>,
    connector: &dyn Connector,
    vm: &std::sync::Mutex<Box<dyn RunningVm>>,
    clean: bool,
    timeout: Duration,
) -> Result<(), ShutdownError> {
    if clean {
        match guest
            .cleanup(&template_plan())
            .map_err(ShutdownError::Cleanup)?
        {
            CleanupOutcome::Done(r) => {
                tracing::info!(
                    ms = r.duration_ms,
                    trimmed = r.trimmed_bytes,
                    failures = r.failures.len(),
                    "template cleanup done by the agent"
                );
                // Best effort, like the script's `set +e`: a step that failed is noted.
                for f in &r.failures {
                    tracing::warn!("template cleanup: {f}");
                }
            }
            CleanupOutcome::Unsupported(why) => {
                tracing::info!("the agent is older than the cleanup request ({why}): running the cleanup script");
                drop(guest);
                guest = connector
                    .connect(Duration::from_secs(60))
                    .map_err(ShutdownError::Cleanup)?;
                // Both scripts, exactly as before the cleanup request existed.
                run_script(&mut *guest, TEMPLATE_CLEANUP, 300, "cleanup script")?;
                run_script(
                    &mut *guest,
                    AGENT_FOR_CLONES,
                    60,
                    "agent settings for clones",
                )?;
                return poweroff_and_wait(guest, vm, clean, timeout);
            }
        }
    }
    agent_for_clones(&mut *guest)?;
    poweroff_and_wait(guest, vm, clean, timeout)
}

fn poweroff_and_wait(
    mut guest: Box<dyn Guest>,
    vm: &std::sync::Mutex<Box<dyn RunningVm>>,
    clean: bool,
    timeout: Duration,
) -> Result<(), ShutdownError> {
    // After the cleanup no service has anything to save (a graceful stop would write a
    // random seed, utmp and journal entries back into the template), so init stops none.
    if clean {
        guest.poweroff_now()
    } else {
        guest.poweroff()
    }
    .map_err(ShutdownError::Poweroff)?;
    drop(guest);
    // Wait in short slices so a cancel (which locks the VM to kill it) is never held up.
    let start = std::time::Instant::now();
    loop {
        let mut v = vm.lock().unwrap_or_else(|p| p.into_inner());
        if v.wait_exit(Duration::from_millis(200))
            .map_err(ShutdownError::Wait)?
            .is_some()
        {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            v.kill();
            return Err(ShutdownError::NoPoweroff(timeout));
        }
        drop(v);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a VM may take to power off after its cleanup.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(180);

/// Waits until every VM of the module has finished its steps: one may serve the others
/// during theirs, so none is shut down half-way through such an exchange.
pub(super) fn wait_for_other_vms(b: &VmBuild) -> Result<(), VmError> {
    if b.module.job.vms.len() > 1 {
        b.note("steps done; waiting for the other VMs before shutting down".into());
    }
    if (b.steps_done)() {
        return Ok(());
    }
    Err(if b.cancelled() {
        VmError::Cancelled
    } else {
        VmError::OtherVmFailed
    })
}

/// Shuts the VM down for capture: the template cleanup (unless the manifest opts out), then
/// power-off, until the engine has ended.
pub(super) fn run(
    b: &VmBuild,
    guest: Box<dyn Guest>,
    connector: &dyn Connector,
    vm: &Launched,
) -> Result<(), VmError> {
    b.phase(VmPhase::ShuttingDown, None);
    Ok(shutdown(
        guest,
        connector,
        &vm.running,
        b.vm.clean_for_template,
        POWEROFF_TIMEOUT,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Stream;
    use crate::guest::ExecOutcome;
    use crate::provision::tests::{FakeConnector, FakeGuest, FakeState};
    use std::path::Path;
    use std::process::ExitStatus;
    use std::sync::{Arc, Mutex};

    /// What the agent-backed guests below saw, session by session.
    #[derive(Default)]
    struct PlanState {
        /// Guest files: path -> (bytes, mode).
        files: BTreeMap<String, (Vec<u8>, u32)>,
        /// True: the agent predates the cleanup request (answers Unsupported and closes).
        old_agent: bool,
        /// True: the cleanup request itself fails (the connection dropped).
        cleanup_fails: bool,
        plans: Vec<CleanupPlan>,
        /// "s<session> <what>" lines, in order.
        log: Vec<String>,
        sessions: usize,
    }

    /// A guest with kiln's agent: it knows cleanup (unless `old_agent`), get-file and
    /// put-file; a session the agent closed refuses everything after.
    struct PlanGuest {
        st: Arc<Mutex<PlanState>>,
        vm: Arc<Mutex<FakeState>>,
        id: usize,
        closed: bool,
    }

    impl PlanGuest {
        fn log(&self, what: String) -> Result<(), GuestError> {
            if self.closed {
                return Err(GuestError::Lost(format!(
                    "session {} was closed by the agent",
                    self.id
                )));
            }
            self.st
                .lock()
                .unwrap()
                .log
                .push(format!("s{} {what}", self.id));
            Ok(())
        }
    }

    impl Guest for PlanGuest {
        fn exec(
            &mut self,
            cmd: &GuestCommand,
            _env: &BTreeMap<String, String>,
            _timeout: Option<Duration>,
            _out: &mut dyn FnMut(Stream, &[u8]),
        ) -> Result<ExecOutcome, GuestError> {
            let what = match cmd {
                GuestCommand::Bash(b) if b == TEMPLATE_CLEANUP => "exec TEMPLATE_CLEANUP",
                GuestCommand::Bash(b) if b == AGENT_FOR_CLONES => "exec AGENT_FOR_CLONES",
                _ => "exec other",
            };
            self.log(what.into())?;
            Ok(ExecOutcome {
                code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 1,
            })
        }
        fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError> {
            self.log(format!("put {path} {mode:o}"))?;
            let mut st = self.st.lock().unwrap();
            st.files.insert(path.into(), (data.to_vec(), mode));
            Ok(())
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            unreachable!("a capture never reboots")
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            self.log("poweroff".into())?;
            self.vm.lock().unwrap().powered_off = true;
            Ok(())
        }
        fn poweroff_now(&mut self) -> Result<(), GuestError> {
            self.log("poweroff-now".into())?;
            self.vm.lock().unwrap().powered_off = true;
            Ok(())
        }
        fn cleanup(&mut self, plan: &CleanupPlan) -> Result<CleanupOutcome, GuestError> {
            self.log("cleanup".into())?;
            let mut st = self.st.lock().unwrap();
            if st.cleanup_fails {
                return Err(GuestError::Lost("connection reset".into()));
            }
            if st.old_agent {
                // What an old agent does: a protocol error, then it closes the session.
                self.closed = true;
                return Ok(CleanupOutcome::Unsupported(
                    "unknown frame type 0x0f".into(),
                ));
            }
            st.plans.push(plan.clone());
            Ok(CleanupOutcome::Done(crate::guest::CleanupReport {
                failures: vec!["remove /var/lib/kiln-agent: busy".into()],
                trimmed_bytes: 1 << 20,
                duration_ms: 3,
            }))
        }
        fn read_file(
            &mut self,
            path: &str,
            _max: u64,
        ) -> Result<Option<(Vec<u8>, u32)>, GuestError> {
            self.log(format!("read {path}"))?;
            Ok(self.st.lock().unwrap().files.get(path).cloned())
        }
    }

    struct PlanConnector {
        st: Arc<Mutex<PlanState>>,
        vm: Arc<Mutex<FakeState>>,
    }

    impl PlanConnector {
        fn session(&self) -> Box<dyn Guest> {
            let mut st = self.st.lock().unwrap();
            let id = st.sessions;
            st.sessions += 1;
            Box::new(PlanGuest {
                st: self.st.clone(),
                vm: self.vm.clone(),
                id,
                closed: false,
            })
        }
    }

    impl Connector for PlanConnector {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            Ok(self.session())
        }
    }

    const SEEDED_DEFAULTS: &str =
        "KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished'\n";

    /// Runs `shutdown` against a PlanGuest; returns the state and the result.
    fn plan_shutdown(
        old_agent: bool,
        cleanup_fails: bool,
        clean: bool,
    ) -> (Result<(), ShutdownError>, Arc<Mutex<PlanState>>, bool) {
        let st = Arc::new(Mutex::new(PlanState {
            old_agent,
            cleanup_fails,
            ..Default::default()
        }));
        st.lock().unwrap().files.insert(
            AGENT_DEFAULTS.into(),
            (SEEDED_DEFAULTS.as_bytes().to_vec(), 0o640),
        );
        let vm_state = Arc::new(Mutex::new(FakeState::default()));
        let conn = PlanConnector {
            st: st.clone(),
            vm: vm_state.clone(),
        };
        let vm: std::sync::Mutex<Box<dyn RunningVm>> = std::sync::Mutex::new(Box::new(FakeVm {
            state: vm_state.clone(),
            killed: false,
        }));
        let r = shutdown(conn.session(), &conn, &vm, clean, Duration::from_secs(1));
        let off = vm_state.lock().unwrap().powered_off;
        (r, st, off)
    }

    #[test]
    fn a_current_agent_cleans_with_one_plan_and_no_process() {
        let (r, st, off) = plan_shutdown(false, false, true);
        r.unwrap();
        assert!(off);
        let st = st.lock().unwrap();
        assert_eq!(st.plans, [template_plan()]);
        assert_eq!(
            st.log,
            [
                "s0 cleanup",
                "s0 read /etc/default/kiln-agent",
                "s0 put /etc/default/kiln-agent 640",
                "s0 poweroff-now",
            ],
            "no exec, no second session"
        );
        assert_eq!(
            st.files[AGENT_DEFAULTS],
            (b"KILN_AGENT_ARGS=''\n".to_vec(), 0o640)
        );
    }

    #[test]
    fn an_older_agent_gets_the_scripts_on_a_new_session() {
        let (r, st, off) = plan_shutdown(true, false, true);
        r.unwrap();
        assert!(off);
        let st = st.lock().unwrap();
        assert!(st.plans.is_empty());
        assert_eq!(
            st.log,
            [
                "s0 cleanup",
                "s1 exec TEMPLATE_CLEANUP",
                "s1 exec AGENT_FOR_CLONES",
                "s1 poweroff-now",
            ]
        );
    }

    #[test]
    fn a_failed_cleanup_request_fails_the_capture() {
        let (r, st, off) = plan_shutdown(false, true, true);
        assert!(
            matches!(&r, Err(ShutdownError::Cleanup(GuestError::Lost(_)))),
            "{r:?}"
        );
        assert!(!off);
        assert_eq!(st.lock().unwrap().log, ["s0 cleanup"]);
    }

    #[test]
    fn opting_out_only_edits_the_agent_settings_natively() {
        let (r, st, off) = plan_shutdown(false, false, false);
        r.unwrap();
        assert!(off);
        let st = st.lock().unwrap();
        assert!(st.plans.is_empty());
        assert_eq!(
            st.log,
            [
                "s0 read /etc/default/kiln-agent",
                "s0 put /etc/default/kiln-agent 640",
                "s0 poweroff",
            ]
        );
        // A settings file without the wait (a bootstrapped image) is not rewritten.
        let (r, st, _) = {
            let st = Arc::new(Mutex::new(PlanState::default()));
            st.lock().unwrap().files.insert(
                AGENT_DEFAULTS.into(),
                (b"KILN_AGENT_ARGS=''\n".to_vec(), 0o644),
            );
            let vm_state = Arc::new(Mutex::new(FakeState::default()));
            let conn = PlanConnector {
                st: st.clone(),
                vm: vm_state.clone(),
            };
            let vm: std::sync::Mutex<Box<dyn RunningVm>> =
                std::sync::Mutex::new(Box::new(FakeVm {
                    state: vm_state,
                    killed: false,
                }));
            let r = shutdown(conn.session(), &conn, &vm, false, Duration::from_secs(1));
            (r, st, ())
        };
        r.unwrap();
        assert_eq!(
            st.lock().unwrap().log,
            ["s0 read /etc/default/kiln-agent", "s0 poweroff"]
        );
    }

    #[test]
    fn the_plan_has_the_scripts_paths_and_unit_text() {
        // The unit is written with the very text the script's here-document holds.
        let heredoc = format!("cat > {SSH_HOSTKEYS_UNIT_PATH} <<'EOF'\n{SSH_HOSTKEYS_UNIT}EOF\n");
        assert!(TEMPLATE_CLEANUP.contains(&heredoc), "{heredoc}");
        fn paths(actions: &[CleanupAction], out: &mut Vec<String>) {
            for a in actions {
                match a {
                    CleanupAction::Truncate(p)
                    | CleanupAction::Remove(p)
                    | CleanupAction::EmptyFilesUnder(p) => out.push(p.clone()),
                    CleanupAction::WriteFile { path, .. } => out.push(path.clone()),
                    CleanupAction::Symlink { target, link } => {
                        out.push(target.clone());
                        out.push(link.clone());
                    }
                    CleanupAction::IfExists { path, then } => {
                        out.push(path.clone());
                        paths(then, out);
                    }
                    CleanupAction::Sync | CleanupAction::TrimAll => {}
                }
            }
        }
        let mut ps = Vec::new();
        let plan = template_plan();
        paths(&plan.actions, &mut ps);
        // Every path the plan touches is one the script names (the symlink's name is the
        // script's `ln -sf UNIT DIR/`).
        for p in &ps {
            let in_script = TEMPLATE_CLEANUP.contains(p.as_str())
                || p == "/etc/systemd/system/multi-user.target.wants/kiln-ssh-hostkeys.service";
            assert!(in_script, "{p} is not in the script");
        }
        // And every path the script removes or truncates is in the plan.
        for line in TEMPLATE_CLEANUP.lines() {
            let line = line.trim();
            let args = ["truncate -s 0 ", "rm -f ", "rm -rf "]
                .iter()
                .find_map(|c| line.strip_prefix(c));
            for p in args.into_iter().flat_map(|a| a.split_whitespace()) {
                assert!(ps.iter().any(|x| x == p), "{p} is missing from the plan");
            }
        }
        assert!(TEMPLATE_CLEANUP.contains("for f in /var/log/**"));
        assert!(ps.iter().any(|p| p == "/var/log"));
        // The plan ends like the script: sync, then trim.
        let n = plan.actions.len();
        assert_eq!(
            plan.actions[n - 2..],
            [CleanupAction::Sync, CleanupAction::TrimAll]
        );
    }

    /// Every path of `actions` under `root`; `TrimAll` dropped (it would trim the host).
    fn rooted(actions: &[CleanupAction], root: &str) -> Vec<CleanupAction> {
        let r = |p: &String| format!("{root}{p}");
        actions
            .iter()
            .filter(|a| **a != CleanupAction::TrimAll)
            .map(|a| match a {
                CleanupAction::Truncate(p) => CleanupAction::Truncate(r(p)),
                CleanupAction::Remove(p) => CleanupAction::Remove(r(p)),
                CleanupAction::EmptyFilesUnder(p) => CleanupAction::EmptyFilesUnder(r(p)),
                CleanupAction::WriteFile { path, mode, data } => CleanupAction::WriteFile {
                    path: r(path),
                    mode: *mode,
                    data: data.clone(),
                },
                CleanupAction::Symlink { target, link } => CleanupAction::Symlink {
                    target: r(target),
                    link: r(link),
                },
                CleanupAction::IfExists { path, then } => CleanupAction::IfExists {
                    path: r(path),
                    then: rooted(then, root),
                },
                other => other.clone(),
            })
            .collect()
    }

    /// A guest root with something for every line of the cleanup, and things it must keep.
    fn template_fixture(root: &Path) {
        let w = |p: &str, data: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        w("etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        w(
            "var/lib/dbus/machine-id",
            "0123456789abcdef0123456789abcdef\n",
        );
        for k in ["rsa", "ed25519"] {
            w(&format!("etc/ssh/ssh_host_{k}_key"), "private");
            w(&format!("etc/ssh/ssh_host_{k}_key.pub"), "public");
        }
        w("etc/ssh/sshd_config", "PermitRootLogin no\n");
        w(
            "etc/systemd/system/multi-user.target.wants/other.service",
            "[Unit]\n",
        );
        w(
            "var/lib/cloud/instances/i-1/user-data.txt",
            "#cloud-config\n",
        );
        std::os::unix::fs::symlink(
            root.join("var/lib/cloud/instances/i-1"),
            root.join("var/lib/cloud/instance"),
        )
        .unwrap();
        w("var/lib/cloud/data/status.json", "{}");
        w("var/lib/cloud/sem/config_ssh", "");
        w("var/lib/cloud/scripts/per-boot/keep.sh", "#!/bin/sh\n");
        w("var/log/journal/abc/system.journal", "journal");
        w("root/.bash_history", "ls\n");
        w("root/.profile", "# keep\n");
        w("tmp/kiln-agent-script-1", "echo");
        w("tmp/keep", "keep");
        w("var/tmp/kiln-x/y", "y");
        w("var/log/kiln-agent.log", "log");
        w("var/lib/kiln-agent/state", "s");
        w("var/log/syslog", "lines\n");
        w("var/log/apt/history.log", "Start-Date\n");
        w("var/log/.hidden.log", "dot\n");
        w("var/log/empty.log", "");
        w("var/cache/apt/archives/nginx_1.22_amd64.deb", "deb");
        w("var/cache/apt/archives/lock", "");
        w("var/cache/apt/archives/partial/x.deb.part", "part");
        w("var/cache/apt/pkgcache.bin", "bin");
        w("var/cache/apt/keep.txt", "keep");
    }

    /// (relative path, kind, content or link target with `root` cut, mode) for every entry.
    fn tree(root: &Path) -> Vec<(String, String, Vec<u8>, u32)> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let mode = m.permissions().mode() & 0o7777;
                if m.file_type().is_symlink() {
                    let t = std::fs::read_link(&p).unwrap().display().to_string();
                    let t = t.replace(root.to_str().unwrap(), "<root>");
                    out.push((rel, "link".into(), t.into_bytes(), 0));
                } else if m.is_dir() {
                    out.push((rel, "dir".into(), vec![], mode));
                    dirs.push(p);
                } else {
                    out.push((rel, "file".into(), std::fs::read(&p).unwrap(), mode));
                }
            }
        }
        out.sort();
        out
    }

    /// The plan, carried out by a real agent (kiln-agent's server, in this process, on a Unix
    /// socket) through `AgentGuest`, leaves the same tree as the script run by bash. Paths
    /// are moved under temporary roots; the trim line and action are left out so the host's
    /// file systems are never trimmed.
    #[test]
    fn the_plan_and_the_script_leave_the_same_tree() {
        let d = tempfile::tempdir().unwrap();
        let (by_script, by_plan) = (d.path().join("script"), d.path().join("plan"));
        template_fixture(&by_script);
        template_fixture(&by_plan);

        let root = by_script.to_str().unwrap();
        // The agent's umask in a guest; the test process's is normally the same.
        let script: String = std::iter::once("umask 022")
            .chain(TEMPLATE_CLEANUP.lines())
            .filter(|l| !l.contains("fstrim"))
            .map(|l| l.replace(" /", &format!(" {root}/")) + "\n")
            .collect();
        assert!(
            script.contains(&format!("[ -d {root}/etc/ssh ]")),
            "{script}"
        );
        let st = std::process::Command::new("bash")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(st.success());

        let sock = d.path().join("agent.sock");
        let config = kiln_agent::server::Config {
            listen: vec![kiln_agent::server::Listen::Unix(sock.clone())],
            work_dir: d.path().join("work"),
            power: kiln_agent::server::PowerAction::Disabled,
            ..Default::default()
        };
        // The agent serves until the test process ends.
        std::thread::spawn(move || kiln_agent::server::serve(config));
        let start = std::time::Instant::now();
        let client = loop {
            match kiln_agent::Client::connect_unix(&sock) {
                Ok(c) => break c,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("the in-process agent does not answer: {e}"),
            }
        };
        let mut guest = crate::guest::AgentGuest(client);
        let plan = CleanupPlan {
            actions: rooted(&template_plan().actions, by_plan.to_str().unwrap()),
        };
        let CleanupOutcome::Done(report) = guest.cleanup(&plan).unwrap() else {
            panic!("the agent does not know cleanup");
        };
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        // The native read and edit of the agent's settings, through the same agent.
        let defaults = by_plan.join("etc/default/kiln-agent");
        std::fs::create_dir_all(defaults.parent().unwrap()).unwrap();
        std::fs::write(&defaults, SEEDED_DEFAULTS).unwrap();
        let got = guest
            .read_file(defaults.to_str().unwrap(), 64 * 1024)
            .unwrap();
        assert_eq!(got, Some((SEEDED_DEFAULTS.as_bytes().to_vec(), 0o644)));
        assert_eq!(
            guest
                .read_file(by_plan.join("absent").to_str().unwrap(), 10)
                .unwrap(),
            None
        );
        assert!(
            guest.read_file(defaults.to_str().unwrap(), 10).is_err(),
            "a file over the cap is refused"
        );
        std::fs::remove_dir_all(by_plan.join("etc/default")).unwrap();

        let (a, b) = (tree(&by_script), tree(&by_plan));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y);
        }
        assert_eq!(a.len(), b.len());
        // And the cleanup did clean: spot checks on the result.
        let names: Vec<&str> = b.iter().map(|e| e.0.as_str()).collect();
        assert!(names.contains(&"etc/ssh/sshd_config"));
        assert!(!names.iter().any(|n| n.contains("ssh_host_")));
        assert!(names.contains(&"etc/systemd/system/kiln-ssh-hostkeys.service"));
        assert!(!names.contains(&"var/lib/cloud/instance"));
        assert!(names.contains(&"var/lib/cloud/scripts/per-boot/keep.sh"));
        assert!(b.iter().any(|e| e.0 == "var/log/syslog" && e.2.is_empty()));
    }

    #[test]
    fn the_native_edit_matches_the_script() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("kiln-agent");
        let script = AGENT_FOR_CLONES.replace(AGENT_DEFAULTS, f.to_str().unwrap());
        for content in [
            "KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished'\n",
            "KILN_AGENT_ARGS='--ready-when /var/lib/cloud/instance/boot-finished --linger-ms 5'\n",
            "KILN_AGENT_ARGS='--linger-ms 5   --ready-when /var/lib/cloud/instance/boot-finished'\n",
            "A=1\nB='x --ready-when /var/lib/cloud/instance/boot-finished --ready-when /var/lib/cloud/instance/boot-finished'\nC=3",
            "KILN_AGENT_ARGS=''\n",
            "",
        ] {
            std::fs::write(&f, content).unwrap();
            let st = std::process::Command::new("sh")
                .args(["-c", &script])
                .status()
                .unwrap();
            assert!(st.success());
            let by_script = std::fs::read(&f).unwrap();
            let native = drop_cloud_init_wait(content.as_bytes());
            assert_eq!(
                native.clone().unwrap_or_else(|| content.as_bytes().to_vec()),
                by_script,
                "{content:?}"
            );
            assert_eq!(native.is_some(), by_script != content.as_bytes());
        }
    }

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
        // FakeGuest knows no cleanup request: the scripts run, on a new session.
        shutdown(
            Box::new(FakeGuest(state.clone())),
            &FakeConnector(state.clone()),
            &vm,
            true,
            Duration::from_secs(1),
        )
        .unwrap();
        let s = state.lock().unwrap();
        assert!(s.powered_off);
        assert!(matches!(&s.commands[0].0, GuestCommand::Bash(b) if b == TEMPLATE_CLEANUP));
        assert!(matches!(&s.commands[1].0, GuestCommand::Bash(b) if b == AGENT_FOR_CLONES));
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
            &FakeConnector(state.clone()),
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
