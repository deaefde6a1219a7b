use std::process::ExitCode;

fn main() -> ExitCode {
    // The per-VM VMM process (`kiln __vmm`) branches off before the CLI parse and logging
    // set-up: its start-up is measured from exec to the guest's first instruction
    // (vmm/README.md); logging is set up once the vCPUs run.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == kiln_vmm::process::CHILD_SUBCOMMAND)
    {
        let code = kiln_vmm::process::child::main(&args[2..], kiln_builder::cli::init_vmm_logging);
        return ExitCode::from(code as u8);
    }
    kiln_builder::cli::main()
}
