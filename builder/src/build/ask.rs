//! `--on-error ask`: at a failed step the VM stays up and the user is asked on the terminal
//! what to do: retry the step, open a shell in the VM (then the question comes again),
//! continue with the next step, or abort. A module's VMs share one terminal, so their
//! questions come one at a time.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::events::EventSink;
use crate::provision::{AfterFailure, StepFailure};
use crate::raw_terminal;

/// Held while a question is on the terminal.
static ONE_QUESTION: Mutex<()> = Mutex::new(());

/// Why `--on-error ask` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "--on-error ask asks on the terminal, and this kiln's stdin is not one: \
     use --on-error abort (keep the VMs' disks) or cleanup"
)]
pub struct NoTerminal;

/// Refuses `ask` when there is no terminal to ask on (checked as the build starts).
pub fn check_terminal() -> Result<(), NoTerminal> {
    if raw_terminal::is_terminal(0) {
        Ok(())
    } else {
        Err(NoTerminal)
    }
}

/// What the user can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Retry,
    Shell,
    Continue,
    Abort,
}

fn parse(line: &str) -> Option<Answer> {
    match line.trim().to_ascii_lowercase().as_str() {
        "r" | "retry" => Some(Answer::Retry),
        "s" | "shell" => Some(Answer::Shell),
        "c" | "continue" => Some(Answer::Continue),
        "a" | "abort" => Some(Answer::Abort),
        _ => None,
    }
}

/// The question and its answers: `read_line` gives the next line typed (`None`: no more,
/// or the build was cancelled, which aborts), `shell` opens a shell in the VM and returns
/// when it ends (or why it could not open).
fn decide(
    failure: &StepFailure,
    out: &mut dyn Write,
    read_line: &mut dyn FnMut() -> Option<String>,
    shell: &mut dyn FnMut() -> Result<(), String>,
) -> AfterFailure {
    let _ = writeln!(out, "\n{}: {}", failure.vm, failure.error);
    loop {
        let _ = write!(
            out,
            "{}: [r]etry step, [s]hell, [c]ontinue (skip the step), [a]bort? ",
            failure.vm
        );
        let _ = out.flush();
        let Some(line) = read_line() else {
            let _ = writeln!(out);
            return AfterFailure::Fail;
        };
        match parse(&line) {
            Some(Answer::Retry) => return AfterFailure::Retry,
            Some(Answer::Continue) => return AfterFailure::Skip,
            Some(Answer::Abort) => return AfterFailure::Fail,
            Some(Answer::Shell) => {
                if let Err(why) = shell() {
                    let _ = writeln!(out, "{}: no shell: {why}", failure.vm);
                }
            }
            None => {
                let _ = writeln!(out, "answer r, s, c or a");
            }
        }
    }
}

/// Asks on this process's terminal about a failed step of the VM whose agent answers on
/// `socket`.
pub(super) struct TerminalAsk<'a> {
    pub events: &'a dyn EventSink,
    pub cancel: &'a AtomicBool,
    pub socket: PathBuf,
}

impl TerminalAsk<'_> {
    pub(super) fn ask(&self, failure: &StepFailure) -> AfterFailure {
        let _turn = ONE_QUESTION.lock().unwrap_or_else(|p| p.into_inner());
        let mut after = AfterFailure::Fail;
        self.events.hold(&mut || {
            after = decide(
                failure,
                &mut std::io::stderr(),
                &mut || self.read_line(),
                &mut || self.shell(failure.vm),
            );
        });
        after
    }

    /// The next line typed, or `None` at its end or once the build is cancelled (Ctrl-C
    /// at the question stops every VM).
    fn read_line(&self) -> Option<String> {
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return None;
            }
            if raw_terminal::readable(0, Duration::from_millis(200)) {
                let mut s = String::new();
                return match std::io::stdin().read_line(&mut s) {
                    Ok(0) | Err(_) => None,
                    Ok(_) => Some(s),
                };
            }
        }
    }

    fn shell(&self, vm: &str) -> Result<(), String> {
        let mut c = crate::running_vm::connect(&self.socket, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        crate::guest_shell::on_terminal(&mut c, vm)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Step, StepKind};
    use crate::provision::StepError;
    use std::collections::VecDeque;

    fn failure_of<'a>(step: &'a Step, error: &'a StepError) -> StepFailure<'a> {
        StepFailure {
            vm: "web",
            number: 2,
            step,
            error,
        }
    }

    /// The decision for typed `lines`, with the shells opened and what was printed.
    fn answer(lines: &[&str], shell_works: bool) -> (AfterFailure, usize, String) {
        let step = Step {
            name: "check".into(),
            timeout: None,
            cache: true,
            kind: StepKind::Shell {
                inline: "test -f /tmp/fixed".into(),
                env: Default::default(),
                execute_command: None,
            },
        };
        let error = StepError::Failed {
            index: 2,
            name: "check".into(),
            status: "exit code 1".into(),
            tail: vec![],
        };
        let mut typed: VecDeque<String> = lines.iter().map(|l| format!("{l}\n")).collect();
        let mut shells = 0;
        let mut out = Vec::new();
        let after = decide(
            &failure_of(&step, &error),
            &mut out,
            &mut || typed.pop_front(),
            &mut || {
                shells += 1;
                if shell_works {
                    Ok(())
                } else {
                    Err("the agent does not answer".into())
                }
            },
        );
        (after, shells, String::from_utf8(out).unwrap())
    }

    #[test]
    fn each_answer_decides() {
        assert_eq!(answer(&["r"], true).0, AfterFailure::Retry);
        assert_eq!(answer(&["continue"], true).0, AfterFailure::Skip);
        assert_eq!(answer(&["A"], true).0, AfterFailure::Fail);
    }

    #[test]
    fn the_question_names_the_step_and_its_error() {
        let (_, _, out) = answer(&["a"], true);
        assert!(
            out.contains("web: step 2 'check' failed: exit code 1"),
            "{out}"
        );
        assert!(
            out.contains("[r]etry step, [s]hell, [c]ontinue (skip the step), [a]bort?"),
            "{out}"
        );
    }

    #[test]
    fn the_question_comes_again_after_a_shell_and_after_a_wrong_answer() {
        let (after, shells, out) = answer(&["s", "what", "s", "r"], true);
        assert_eq!(after, AfterFailure::Retry);
        assert_eq!(shells, 2);
        assert_eq!(out.matches("[a]bort?").count(), 4, "{out}");
        assert!(out.contains("answer r, s, c or a"), "{out}");
    }

    #[test]
    fn a_shell_that_cannot_open_says_why_and_asks_again() {
        let (after, shells, out) = answer(&["s", "c"], false);
        assert_eq!((after, shells), (AfterFailure::Skip, 1));
        assert!(
            out.contains("web: no shell: the agent does not answer"),
            "{out}"
        );
    }

    #[test]
    fn no_more_input_aborts() {
        let (after, _, _) = answer(&[], true);
        assert_eq!(after, AfterFailure::Fail);
        let (after, shells, _) = answer(&["s"], true);
        assert_eq!((after, shells), (AfterFailure::Fail, 1));
    }
}
