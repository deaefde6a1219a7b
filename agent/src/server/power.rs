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
/// systemd(1): SIGRTMIN+4 "Powers off the machine, starts the poweroff.target unit" and
/// SIGRTMIN+5 "Reboots the machine, starts the reboot.target unit", both in the
/// "replace-irreversibly" job mode: the orderly shutdown that `systemctl poweroff|reboot`
/// asks for. Used only where systemctl would end up doing exactly that (see
/// [`pid1_signal`]); starting systemctl under an emulated CPU took about 4 s (it first
/// tries the system bus for logind, fails, then falls back to PID 1).
const SYSTEMD_POWEROFF: libc::c_int = 34 + 4;
const SYSTEMD_REBOOT: libc::c_int = 34 + 5;

/// D-Bus's system bus socket. While it is absent there is no logind to ask, and systemctl
/// falls back to starting the target through PID 1, which the signals above do directly.
/// While it is there, systemctl goes through logind (its inhibitors, its shutdown
/// broadcast), so the agent starts systemctl.
const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// The signal that asks PID 1 for `kind` directly, when PID 1 is systemd and the signal
/// does what systemctl would. `pid1_exe` is /proc/1/exe's target; `systemd_booted` says
/// /run/systemd/system exists (sd_booted(3)'s test); `system_bus` says the D-Bus system
/// bus socket exists.
fn pid1_signal(
    kind: Kind,
    pid1_exe: Option<&std::path::Path>,
    systemd_booted: bool,
    system_bus: bool,
) -> Option<libc::c_int> {
    let exe_is_systemd = pid1_exe.is_some_and(|p| {
        let p = p.to_string_lossy();
        // An upgraded systemd binary reads "/usr/lib/systemd/systemd (deleted)".
        p.trim_end_matches(" (deleted)").ends_with("systemd")
    });
    match kind {
        _ if !(exe_is_systemd || systemd_booted) => None,
        Kind::PoweroffNow => Some(SYSTEMD_POWEROFF_NOW),
        Kind::Reboot if !system_bus => Some(SYSTEMD_REBOOT),
        Kind::Poweroff if !system_bus => Some(SYSTEMD_POWEROFF),
        Kind::Reboot | Kind::Poweroff => None,
    }
}

fn system(kind: Kind) {
    // SAFETY: getpid cannot fail.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
        let exe = std::fs::read_link("/proc/1/exe").ok();
        let booted = std::path::Path::new("/run/systemd/system").exists();
        let bus = std::path::Path::new(SYSTEM_BUS_SOCKET).exists();
        if let Some(sig) = pid1_signal(kind, exe.as_deref(), booted, bus) {
            // SAFETY: kill(2) with a constant pid and signal number; no memory is involved.
            if unsafe { libc::kill(1, sig) } == 0 {
                tracing::info!(
                    ?kind,
                    "sent signal {sig} (SIGRTMIN+{}) to systemd",
                    sig - 34
                );
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
        for bus in [false, true] {
            assert_eq!(
                pid1_signal(Kind::PoweroffNow, Some(systemd), false, bus),
                Some(48)
            );
            assert_eq!(
                pid1_signal(
                    Kind::PoweroffNow,
                    Some(Path::new("/lib/systemd/systemd (deleted)")),
                    false,
                    bus
                ),
                Some(48)
            );
            // /proc/1/exe unreadable, but the system was booted by systemd.
            assert_eq!(pid1_signal(Kind::PoweroffNow, None, true, bus), Some(48));
            // Another init: keep asking through the commands.
            for kind in [Kind::PoweroffNow, Kind::Poweroff, Kind::Reboot] {
                assert_eq!(
                    pid1_signal(kind, Some(Path::new("/bin/busybox")), false, bus),
                    None
                );
                assert_eq!(pid1_signal(kind, None, false, bus), None);
            }
        }
    }

    #[test]
    fn orderly_reboot_and_poweroff_signal_systemd_only_without_a_system_bus() {
        let systemd = Path::new("/usr/lib/systemd/systemd");
        // No system bus: systemctl would start the target through PID 1; so does the signal.
        assert_eq!(
            pid1_signal(Kind::Reboot, Some(systemd), true, false),
            Some(39)
        );
        assert_eq!(
            pid1_signal(Kind::Poweroff, Some(systemd), true, false),
            Some(38)
        );
        assert_eq!(pid1_signal(Kind::Reboot, None, true, false), Some(39));
        // A system bus: systemctl goes through logind (inhibitors), so it is started.
        assert_eq!(pid1_signal(Kind::Reboot, Some(systemd), true, true), None);
        assert_eq!(pid1_signal(Kind::Poweroff, Some(systemd), true, true), None);
    }
}
