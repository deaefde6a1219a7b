//! kiln-agent: the guest agent. Listens on vsock (and/or Unix/TCP for tests) and serves
//! kiln's protocol. Built static (`-C target-feature=+crt-static`) to run on any distro.
//!
//! The command line is parsed by hand and logs go through a tiny `tracing` subscriber
//! written here: clap and tracing-subscriber would triple the size of a binary that is
//! copied into every guest.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_agent::server::{self, Config, Listen, PowerAction};

const USAGE: &str = "\
usage: kiln-agent [options]

  --listen ADDR        vsock:PORT | unix:PATH | tcp:IP:PORT (repeatable; default vsock:1024)
  --work-dir DIR       where scripts are written (default /run/kiln-agent)
  --ready-when PATH    report ready only once PATH exists (repeatable)
  --ready-when-mounted report ready only once the local file systems the boot mounts
                       (fstab, local-fs.target's mount units) are mounted
  --autogroup-nice N   run the agent's session and each step's session at autogroup nice
                       N (-20..19; the unit passes -10): steps go ahead of the rest of a
                       still-booting guest
  --mounts-root DIR    with --ready-when-mounted, read etc/fstab, the unit folders and
                       proc/self/mountinfo under DIR instead of / (tests)
  --power-action A     system | exit | disabled (default: system when listening on vsock,
                       otherwise disabled, so a test agent never reboots its host)
  --max-sessions N     refuse sessions beyond N (default 256)
  --linger-ms N        read output this long after a command exits (default 1000)
  --etc DIR            read passwd and group from DIR (default /etc)
  --log LEVEL          error | warn | info | debug (default info)
  --version, --help
";

fn main() {
    let mut cfg = Config {
        listen: Vec::new(),
        ..Config::default()
    };
    let mut power: Option<PowerAction> = None;
    let mut level = tracing::Level::INFO;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> String {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--listen" => {
                let v = value("--listen");
                cfg.listen
                    .push(v.parse::<Listen>().unwrap_or_else(|e| fail(&e)));
            }
            "--work-dir" => cfg.work_dir = PathBuf::from(value("--work-dir")),
            "--ready-when" => cfg.ready_when.push(PathBuf::from(value("--ready-when"))),
            "--ready-when-mounted" => {
                cfg.mounts_root.get_or_insert_with(|| PathBuf::from("/"));
            }
            "--autogroup-nice" => {
                let n: i32 = value("--autogroup-nice")
                    .parse()
                    .unwrap_or_else(|_| fail("--autogroup-nice needs a number"));
                if !(-20..=19).contains(&n) {
                    fail("--autogroup-nice must be between -20 and 19");
                }
                cfg.autogroup_nice = Some(n);
            }
            "--mounts-root" => cfg.mounts_root = Some(PathBuf::from(value("--mounts-root"))),
            "--power-action" => {
                power = Some(match value("--power-action").as_str() {
                    "system" => PowerAction::System,
                    "exit" => PowerAction::Exit,
                    "disabled" => PowerAction::Disabled,
                    other => fail(&format!("unknown power action {other:?}")),
                })
            }
            "--max-sessions" => {
                cfg.max_sessions = value("--max-sessions")
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--max-sessions: {e}")))
            }
            "--linger-ms" => {
                cfg.linger = Duration::from_millis(
                    value("--linger-ms")
                        .parse()
                        .unwrap_or_else(|e| fail(&format!("--linger-ms: {e}"))),
                )
            }
            "--etc" => cfg.etc_dir = PathBuf::from(value("--etc")),
            "--log" => {
                level = match value("--log").as_str() {
                    "error" => tracing::Level::ERROR,
                    "warn" => tracing::Level::WARN,
                    "info" => tracing::Level::INFO,
                    "debug" => tracing::Level::DEBUG,
                    "trace" => tracing::Level::TRACE,
                    other => fail(&format!("unknown log level {other:?}")),
                }
            }
            "--version" => {
                println!(
                    "kiln-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    kiln_agent::PROTOCOL_VERSION
                );
                return;
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    if cfg.listen.is_empty() {
        cfg.listen.push(Listen::Vsock(kiln_agent::VSOCK_PORT));
    }
    cfg.power = power.unwrap_or(
        if cfg.listen.iter().any(|l| matches!(l, Listen::Vsock(_))) {
            PowerAction::System
        } else {
            PowerAction::Disabled
        },
    );
    let _ = tracing::subscriber::set_global_default(StderrLog {
        max: level,
        start: Instant::now(),
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        power = ?cfg.power,
        "kiln-agent starting"
    );
    if let Err(e) = server::serve(cfg) {
        tracing::error!("cannot serve: {e}");
        std::process::exit(1);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("kiln-agent: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

/// Writes each event as one line on stderr (the journal or the init script's log file).
struct StderrLog {
    max: tracing::Level,
    start: Instant,
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        if f.name() == "message" {
            self.0.insert_str(0, v);
        } else {
            let _ = write!(self.0, " {}={v}", f.name());
        }
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.0.insert_str(0, &format!("{v:?}"));
        } else {
            let _ = write!(self.0, " {}={v:?}", f.name());
        }
    }
}

impl tracing::Subscriber for StderrLog {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= self.max
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        let t = self.start.elapsed();
        eprintln!(
            "[{:>5}.{:03}] kiln-agent {}: {}",
            t.as_secs(),
            t.subsec_millis(),
            e.metadata().level(),
            f.0
        );
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
