//! The command lines an SSH guest runs: a step's script for its shell (`bash`, `sh`, or on
//! Windows `powershell` and `cmd` the way Packer runs them), with its environment, folder and
//! timeout, as one string for the SSH `exec` request (sshd hands it to the user's shell).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::job::StepShell;

/// Scripts up to this size go inline (`bash -c '...'`, one round trip); larger ones are
/// uploaded first, since Linux caps one argument at 128 KiB.
pub const INLINE_MAX: usize = 32 * 1024;

/// Where a script that is uploaded is written.
pub fn script_path(shell: StepShell, n: u64) -> String {
    match shell {
        StepShell::Bash | StepShell::Sh => format!("/tmp/kiln-script-{n}.sh"),
        StepShell::Powershell => format!("C:/Windows/Temp/kiln-script-{n}.ps1"),
        StepShell::Cmd => format!("C:/Windows/Temp/kiln-script-{n}.cmd"),
    }
}

/// Whether the shell is a POSIX one (a Linux or Unix guest).
pub fn is_posix(shell: StepShell) -> bool {
    matches!(shell, StepShell::Bash | StepShell::Sh)
}

/// `s` as one POSIX shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A name a POSIX shell and `set` in cmd take as a variable.
pub fn valid_env_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// What runs and how, for [`posix_command`].
pub struct Posix<'a> {
    /// The program and its arguments, quoted here.
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a str>,
    /// Killed with its whole process group when it passes (by coreutils' or busybox's
    /// `timeout`, which makes the group); the client's own deadline is the backstop.
    pub timeout: Option<Duration>,
}

/// One command line for a POSIX login shell. The variables are exported rather than sent as
/// SSH `env` requests, which sshd refuses unless `AcceptEnv` names them (Packer does the same).
pub fn posix_command(p: &Posix) -> String {
    let mut s = String::new();
    if let Some(d) = p.cwd {
        s.push_str(&format!("cd {} && ", quote(d)));
    }
    for (k, v) in p.env {
        s.push_str(&format!("{k}={} && export {k} && ", quote(v)));
    }
    let argv: Vec<String> = p.argv.iter().map(|a| quote(a)).collect();
    let argv = argv.join(" ");
    match p.timeout {
        // Rounded up: a step is never cut short.
        Some(t) => {
            let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
            s.push_str(&format!(
                "if command -v timeout >/dev/null 2>&1; then exec timeout -s KILL {secs} {argv}; else exec {argv}; fi"
            ));
        }
        None => s.push_str(&format!("exec {argv}")),
    }
    s
}

/// The argv that runs a script body inline, or an uploaded script file, with a POSIX shell.
pub fn posix_script_argv(
    shell: StepShell,
    inline: Option<&str>,
    path: Option<&str>,
) -> Vec<String> {
    let prog = if shell == StepShell::Sh { "sh" } else { "bash" };
    match (inline, path) {
        (Some(body), _) => vec![prog.into(), "-c".into(), body.into(), "kiln-step".into()],
        (None, Some(p)) => vec![prog.into(), p.into()],
        (None, None) => vec![prog.into()],
    }
}

/// The uploaded text of a Windows script: the variables set first, then the body (there is
/// no portable way to pass them on the command line of both shells).
pub fn windows_script(shell: StepShell, env: &BTreeMap<String, String>, body: &str) -> String {
    let mut s = String::new();
    for (k, v) in env {
        match shell {
            StepShell::Powershell => {
                s.push_str(&format!("$env:{k} = '{}'\r\n", v.replace('\'', "''")))
            }
            _ => s.push_str(&format!("@set \"{k}={v}\"\r\n")),
        }
    }
    s.push_str(body);
    s
}

/// The command that runs an uploaded Windows script, as Packer's `windows-shell` and
/// `powershell` provisioners do.
pub fn windows_command(shell: StepShell, path: &str) -> String {
    match shell {
        StepShell::Powershell => {
            format!(
                "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -File \"{path}\""
            )
        }
        _ => format!("cmd /c \"{path}\""),
    }
}

/// A program and its arguments on a Windows command line (quoted where they hold spaces).
pub fn windows_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains([' ', '\t', '"']) {
                format!("\"{}\"", a.replace('"', "\\\""))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command that reboots or powers off the guest, after the SSH request has been
/// answered (the session then drops). Root needs no `sudo`; other users need a sudo that
/// asks no password (as for Packer's `shutdown_command`).
pub fn power_command(shell: StepShell, root: bool, reboot: bool) -> String {
    if is_posix(shell) {
        let what = if reboot { "reboot" } else { "poweroff" };
        let sudo = if root { "" } else { "sudo -n " };
        // Detached and a second late, so the exec's answer reaches kiln before sshd stops.
        format!("nohup sh -c 'sleep 1; {sudo}{what}' >/dev/null 2>&1 &")
    } else {
        let flag = if reboot { "/r" } else { "/s" };
        format!("shutdown {flag} /f /t 5")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn posix_quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn posix_command_has_folder_env_and_timeout() {
        let argv = posix_script_argv(StepShell::Bash, Some("echo $A"), None);
        let e = env(&[("A", "x y'z")]);
        let c = posix_command(&Posix {
            argv: &argv,
            env: &e,
            cwd: Some("/srv"),
            timeout: Some(Duration::from_millis(1500)),
        });
        assert_eq!(
            c,
            "cd '/srv' && A='x y'\\''z' && export A && if command -v timeout >/dev/null 2>&1; \
             then exec timeout -s KILL 2 'bash' '-c' 'echo $A' 'kiln-step'; \
             else exec 'bash' '-c' 'echo $A' 'kiln-step'; fi"
        );
        let argv = posix_script_argv(StepShell::Sh, None, Some("/tmp/s.sh"));
        let c = posix_command(&Posix {
            argv: &argv,
            env: &BTreeMap::new(),
            cwd: None,
            timeout: None,
        });
        assert_eq!(c, "exec 'sh' '/tmp/s.sh'");
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("_A1"));
        assert!(!valid_env_name("1A"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
    }

    #[test]
    fn windows_command_lines_as_packer_runs_them() {
        let p = script_path(StepShell::Powershell, 3);
        assert_eq!(p, "C:/Windows/Temp/kiln-script-3.ps1");
        assert_eq!(
            windows_command(StepShell::Powershell, &p),
            "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -File \"C:/Windows/Temp/kiln-script-3.ps1\""
        );
        let p = script_path(StepShell::Cmd, 4);
        assert_eq!(
            windows_command(StepShell::Cmd, &p),
            "cmd /c \"C:/Windows/Temp/kiln-script-4.cmd\""
        );
        let e = env(&[("A", "it's")]);
        assert_eq!(
            windows_script(StepShell::Powershell, &e, "Write-Host $env:A"),
            "$env:A = 'it''s'\r\nWrite-Host $env:A"
        );
        assert_eq!(
            windows_script(StepShell::Cmd, &e, "echo %A%"),
            "@set \"A=it's\"\r\necho %A%"
        );
        assert_eq!(
            windows_argv(&["dir".into(), "C:/Program Files".into()]),
            "dir \"C:/Program Files\""
        );
    }

    #[test]
    fn power_commands() {
        assert_eq!(
            power_command(StepShell::Bash, true, true),
            "nohup sh -c 'sleep 1; reboot' >/dev/null 2>&1 &"
        );
        assert_eq!(
            power_command(StepShell::Sh, false, false),
            "nohup sh -c 'sleep 1; sudo -n poweroff' >/dev/null 2>&1 &"
        );
        assert_eq!(
            power_command(StepShell::Powershell, false, true),
            "shutdown /r /f /t 5"
        );
        assert_eq!(
            power_command(StepShell::Cmd, false, false),
            "shutdown /s /f /t 5"
        );
    }
}
