//! Shared by the KVM tests: skip loudly without /dev/kvm, run a tiny guest program, and
//! ([`virtio_guest`]) a tiny virtio driver that runs a test-written script against real
//! kiln devices behind the virtio-mmio transport.

#![allow(dead_code)]

pub use kiln_e2e::kvm_or_skip;
pub use kiln_e2e::virtio_guest;

use std::time::Duration;

use kiln_vmm::arch::x86_64::regs::BootMode;
use kiln_vmm::exit::ExitReason;
use kiln_vmm::machine::{Machine, VmConfig};
use kiln_vmm::transport::VirtioDevice;

// The test kit's virtio driver takes its register offsets from Linux's header: the
// transport must use the same ones, or these tests fail to build.
const _: () = {
    use kiln_vmm::transport::mmio::reg as transport;
    use virtio_guest::reg as driver;
    let pairs = [
        (transport::MAGIC, driver::MAGIC),
        (transport::VERSION, driver::VERSION),
        (transport::DEVICE_ID, driver::DEVICE_ID),
        (transport::DEVICE_FEATURES, driver::DEVICE_FEATURES),
        (transport::DEVICE_FEATURES_SEL, driver::DEVICE_FEATURES_SEL),
        (transport::DRIVER_FEATURES, driver::DRIVER_FEATURES),
        (transport::DRIVER_FEATURES_SEL, driver::DRIVER_FEATURES_SEL),
        (transport::QUEUE_SEL, driver::QUEUE_SEL),
        (transport::QUEUE_NUM_MAX, driver::QUEUE_NUM_MAX),
        (transport::QUEUE_NUM, driver::QUEUE_NUM),
        (transport::QUEUE_READY, driver::QUEUE_READY),
        (transport::QUEUE_NOTIFY, driver::QUEUE_NOTIFY),
        (transport::INTERRUPT_STATUS, driver::INTERRUPT_STATUS),
        (transport::STATUS, driver::STATUS),
        (transport::QUEUE_DESC_LOW, driver::QUEUE_DESC_LOW),
        (transport::QUEUE_DESC_HIGH, driver::QUEUE_DESC_HIGH),
        (transport::QUEUE_DRIVER_LOW, driver::QUEUE_DRIVER_LOW),
        (transport::QUEUE_DRIVER_HIGH, driver::QUEUE_DRIVER_HIGH),
        (transport::QUEUE_DEVICE_LOW, driver::QUEUE_DEVICE_LOW),
        (transport::QUEUE_DEVICE_HIGH, driver::QUEUE_DEVICE_HIGH),
        (transport::CONFIG, driver::CONFIG),
    ];
    let mut i = 0;
    while i < pairs.len() {
        assert!(
            pairs[i].0 == pairs[i].1,
            "a virtio-mmio offset of the transport differs from Linux's"
        );
        i += 1;
    }
};

/// Bound on how long any tiny guest may run (PVM emulates some supervisor instructions
/// slowly, but these programs need milliseconds).
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Outcome {
    pub reason: ExitReason,
    pub console: String,
}

/// Run `segments` in `mode` on `vcpus` vCPUs until the VM ends.
pub fn run_program(segments: Vec<(u64, Vec<u8>)>, mode: BootMode, vcpus: u8) -> Outcome {
    let config = VmConfig::builder()
        .memory(64 << 20)
        .vcpus(vcpus)
        .program(segments, mode)
        .capture_console(true)
        .build()
        .expect("config");
    let mut m = Machine::start(config).expect("start VM");
    let reason = match m.wait_timeout(TIMEOUT) {
        Some(r) => r,
        None => {
            let console = String::from_utf8_lossy(&m.console_output()).to_string();
            m.stop();
            panic!("guest did not end within {TIMEOUT:?}; console so far: {console:?}");
        }
    };
    Outcome {
        reason,
        console: String::from_utf8_lossy(&m.console_output()).to_string(),
    }
}

/// A bzImage: one setup sector after the boot sector, then the protected-mode part.
pub fn fake_bzimage(protected_mode: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    img.extend_from_slice(protected_mode);
    img
}

/// A bzImage whose 64-bit entry runs `program` (assembled for 0x10_0200).
pub fn bzimage_running(program: &[u8]) -> Vec<u8> {
    let mut pm = vec![0x90u8; 0x200];
    pm.extend_from_slice(program);
    fake_bzimage(&pm)
}

/// Start a VM running `script`'s driver program (long mode) with `devices` on the
/// virtio-mmio transport, in the order the script's [`virtio_guest::Device`]s number them.
pub fn start_script(script: &virtio_guest::Script, devices: Vec<Box<dyn VirtioDevice>>) -> Machine {
    let mut b = VmConfig::builder()
        .memory(virtio_guest::GUEST_MEMORY)
        .program(
            script.segments(),
            BootMode::Long {
                rip: virtio_guest::CODE,
                rsi: 0,
            },
        )
        .capture_console(true);
    for d in devices {
        b = b.device(d);
    }
    Machine::start(b.build().expect("VM config")).expect("start VM")
}

/// Wait for the script's VM to end (panicking with the console if it outruns
/// [`TIMEOUT`]); returns why it ended and the console output.
pub fn wait_script(m: &mut Machine) -> (ExitReason, String) {
    let reason = m.wait_timeout(TIMEOUT);
    let console = String::from_utf8_lossy(&m.console_output()).to_string();
    let Some(reason) = reason else {
        m.stop();
        panic!("guest did not end within {TIMEOUT:?}; console so far: {console:?}");
    };
    (reason, console)
}

/// Wait for the script's VM to power off; panic, naming the failed step or showing the
/// console, if it ends any other way, fails a check or outruns [`TIMEOUT`]. Returns the
/// console output.
pub fn finish_script(m: &mut Machine, script: &virtio_guest::Script) -> String {
    let (reason, console) = wait_script(m);
    if let Err(e) = script.verdict(&console) {
        panic!("{e}");
    }
    assert_eq!(reason, ExitReason::Poweroff, "console: {console:?}");
    console
}

/// Prints warnings and errors from kiln's code to the test output (no subscriber crate is
/// a dependency of kiln-vmm's tests), so a device that refuses a chain says why.
pub fn log_warnings() {
    let _ = tracing::subscriber::set_global_default(StderrLog);
}

struct StderrLog;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for StderrLog {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        eprintln!("{} {}:{}", e.metadata().level(), e.metadata().target(), f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
