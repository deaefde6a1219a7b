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

fn system(kind: Kind) {
    // SAFETY: getpid cannot fail.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
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
