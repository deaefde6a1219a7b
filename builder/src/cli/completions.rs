//! `kiln completions SHELL`: the shell's completion script for kiln, generated from the same
//! clap definition as the parser, so it never lists a flag kiln lacks.

use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

/// Writes the script to stdout. Install it where the shell looks, e.g.
/// `kiln completions bash > /usr/share/bash-completion/completions/kiln`.
pub fn completions(a: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "kiln", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut super::super::Cli::command(), "kiln", &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["build", "clone", "serve", "completions"] {
                assert!(text.contains(sub), "{shell}: no `{sub}`");
            }
        }
    }
}
