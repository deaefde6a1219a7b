use std::process::ExitCode;

fn main() -> ExitCode {
    kiln_builder::cli::main()
}
