//! Reboot and power-off, carried out after the acknowledgement has been sent.

use std::time::Duration;

/// What a reboot or poweroff request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Ask init (systemctl, reboot/poweroff, busybox), falling back to reboot(2) after sync.
    System,
    /// Exit the agent process (tests: proves the acknowledgement came first).
    Exit,
    /// Refuse with an error (the default off vsock, so a test agent never reboots its host).
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reboot,
    Poweroff,
    /// Power off without stopping services (`systemctl poweroff --force`).
    PoweroffNow,
}

/// Carry out `kind` on a background thread a moment after the acknowledgement went out.
pub fn schedule(action: PowerAction, kind: Kind) {
    let r = std::thread::Builder::new()
        .name("power".into())
        .spawn(move || {
            // Let the acknowledgement reach the host before the guest goes down.
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            match action {
                PowerAction::Disabled => {}
                PowerAction::Exit => {
                    tracing::info!(?kind, "power action: exiting the agent (test mode)");
                    std::process::exit(0);
                }
                PowerAction::System => system(kind),
            }
        });
    if let Err(e) = r {
        tracing::error!("cannot schedule {kind:?}: {e}");
    }
}

/// systemd's "immediate power-off" signal (systemd(1): SIGRTMIN+14 "Immediately powers off
/// the machine"): PID 1 leaves its main loop with the power-off objective, exactly what
/// `systemctl poweroff --force` asks of it over D-Bus (the `PowerOff()` manager method):
/// no unit is stopped; systemd-shutdown kills every process, syncs, unmounts or remounts
/// read-only, and powers off. Sending it saves starting systemctl, which under an emulated
/// CPU costs about half a second. SIGRTMIN here is systemd's, i.e. glibc's (34: glibc keeps
/// two real-time signals for its threads); musl's is 35, so the number is spelled out
/// rather than taken from the libc this agent links.
const SYSTEMD_POWEROFF_NOW: libc::c_int = 34 + 14;

/// The signal that asks PID 1 for `kind` directly, when PID 1 is systemd and `kind` has
/// one. `pid1_exe` is /proc/1/exe's target; `systemd_booted` says /run/systemd/system
/// exists (sd_booted(3)'s test).
fn pid1_signal(
    kind: Kind,
    pid1_exe: Option<&std::path::Path>,
    systemd_booted: bool,
) -> Option<libc::c_int> {
    let exe_is_systemd = pid1_exe.is_some_and(|p| {
        let p = p.to_string_lossy();
        // An upgraded systemd binary reads "/usr/lib/systemd/systemd (deleted)".
        p.trim_end_matches(" (deleted)").ends_with("systemd")
    });
    match kind {
        Kind::PoweroffNow if exe_is_systemd || systemd_booted => Some(SYSTEMD_POWEROFF_NOW),
        _ => None,
    }
}

fn system(kind: Kind) {
    // SAFETY: getpid cannot fail.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
        let exe = std::fs::read_link("/proc/1/exe").ok();
        let booted = std::path::Path::new("/run/systemd/system").exists();
        if let Some(sig) = pid1_signal(kind, exe.as_deref(), booted) {
            // SAFETY: kill(2) with a constant pid and signal number; no memory is involved.
            if unsafe { libc::kill(1, sig) } == 0 {
                tracing::info!(?kind, "sent signal {sig} (SIGRTMIN+14) to systemd");
                return;
            }
            tracing::warn!(
                ?kind,
                "signalling systemd failed ({}); asking systemctl",
                std::io::Error::last_os_error()
            );
        }
        let cmds: &[&[&str]] = match kind {
            Kind::Reboot => &[
                &["systemctl", "reboot"],
                &["reboot"],
                &["busybox", "reboot"],
            ],
            Kind::Poweroff => &[
                &["systemctl", "poweroff"],
                &["poweroff"],
                &["busybox", "poweroff"],
            ],
            // systemd's "--force": no unit is stopped, but every process is killed and the
            // file systems are unmounted or remounted read-only before the power goes.
            Kind::PoweroffNow => &[
                &["systemctl", "poweroff", "--force"],
                &["busybox", "poweroff", "-f"],
            ],
        };
        for c in cmds {
            let ok = std::process::Command::new(c[0])
                .args(&c[1..])
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                tracing::info!(?kind, "asked init with {:?}", c);
                return;
            }
        }
        tracing::warn!(?kind, "init did not accept the request: using reboot(2)");
    }
    let cmd = match kind {
        Kind::Reboot => libc::RB_AUTOBOOT,
        Kind::Poweroff | Kind::PoweroffNow => libc::RB_POWER_OFF,
    };
    // SAFETY: reboot(2) with a valid command; the file systems were synced above.
    let r = unsafe { libc::reboot(cmd) };
    if r < 0 {
        tracing::error!(
            ?kind,
            "reboot(2) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn poweroff_now_signals_systemd_only() {
        let systemd = Path::new("/usr/lib/systemd/systemd");
        assert_eq!(
            pid1_signal(Kind::PoweroffNow, Some(systemd), false),
            Some(48)
        );
        assert_eq!(
            pid1_signal(
                Kind::PoweroffNow,
                Some(Path::new("/lib/systemd/systemd (deleted)")),
                false
            ),
            Some(48)
        );
        // /proc/1/exe unreadable, but the system was booted by systemd.
        assert_eq!(pid1_signal(Kind::PoweroffNow, None, true), Some(48));
        // Another init: keep asking through the commands.
        assert_eq!(
            pid1_signal(Kind::PoweroffNow, Some(Path::new("/bin/busybox")), false),
            None
        );
        assert_eq!(pid1_signal(Kind::PoweroffNow, None, false), None);
        // An orderly power-off or a reboot stays with systemctl (units are stopped).
        assert_eq!(pid1_signal(Kind::Poweroff, Some(systemd), true), None);
        assert_eq!(pid1_signal(Kind::Reboot, Some(systemd), true), None);
    }
}
