//! `kiln vm run`. The VMM child (`kiln __vmm`) branches off in `main.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kiln_vmm::exit::ExitReason;
use kiln_vmm::process::protocol::exit_code;
use kiln_vmm::process::{VmProcess, VmSpec};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot one VM from a kernel by hand, in its own VMM process.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnReset {
    /// End with the reason "reset".
    Exit,
    /// Boot the VM again in a fresh VMM process.
    Restart,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: a bzImage or an ELF vmlinux (PVH entry used when present).
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// A disk image (raw or qcow2) offered as virtio-blk; repeat for more.
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub mem: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Also show the serial console on this terminal (and type into it).
    #[arg(long)]
    pub console: bool,
    /// Append the serial console to this file.
    #[arg(long, default_value = "kiln-vm-console.log")]
    pub console_log: PathBuf,
    /// What a guest reboot does.
    #[arg(long, value_enum, default_value_t = OnReset::Exit)]
    pub on_reset: OnReset,
}

pub fn run(c: VmCommand) -> anyhow::Result<ExitCode> {
    match c {
        VmCommand::Run(a) => run_vm(a),
    }
}

fn run_vm(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mem_size = kiln_vmm::memory::parse_size(&a.mem)
        .with_context(|| format!("--mem {:?}: expected a size such as 512M or 2G", a.mem))?;
    let spec = VmSpec {
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: Some(a.cmdline.clone()),
        disks: a
            .disk
            .iter()
            .map(kiln_vmm::process::protocol::DiskSpec::writable)
            .collect(),
        mem_size,
        vcpus: a.cpus,
        console_log: Some(a.console_log.clone()),
        console_terminal: a.console,
        ..VmSpec::default()
    };
    let exe = std::env::current_exe().context("finding the kiln binary to run the VMM")?;
    loop {
        let socket = kiln_vmm::process::parent::default_socket_path();
        let mut p = VmProcess::spawn(&exe, &spec, &socket).context("starting the VMM process")?;
        p.start().context("booting the VM")?;
        let reason = p.wait().context("waiting for the VM")?;
        eprintln!(
            "kiln: VM ended: {reason} (console log: {})",
            a.console_log.display()
        );
        if reason == ExitReason::Reset && a.on_reset == OnReset::Restart {
            eprintln!("kiln: restarting the VM");
            continue;
        }
        return Ok(ExitCode::from(exit_code(&reason) as u8));
    }
}
