//! The static guest binary that kiln's build makes and embeds (target/agent/kiln-agent): really
//! static, small, found by locate_binary, and it serves.
//! One test function on purpose: it sets KILN_AGENT_BIN, which must not race other tests.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::Agent;
use kiln_agent::{ExecRequest, PutOptions};

fn static_agent() -> Option<PathBuf> {
    // CARGO_BIN_EXE is <target>/<profile>/kiln-agent; kiln's build.rs builds <target>/agent/kiln-agent.
    let bin = Path::new(common::AGENT);
    let candidates = [
        bin.parent()?.join("../agent/kiln-agent"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/agent/kiln-agent"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

#[test]
fn the_static_agent_is_static_small_found_and_serves() {
    let Some(path) = static_agent() else {
        kiln_e2e::skip("no static agent at target/agent/kiln-agent; building kiln makes it (`cargo build \
             --release -p kiln-builder`), or `cargo rustc -p kiln-agent --bin kiln-agent --profile agent -- -C target-feature=+crt-static`");
        return;
    };
    let path = path.canonicalize().unwrap();

    let file = Command::new("file")
        .arg(&path)
        .output()
        .expect("run file(1)");
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "file(1) says: {file}"
    );
    assert!(file.contains("x86-64"), "{file}");
    let ldd = Command::new("ldd").arg(&path).output().expect("run ldd");
    let ldd = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "ldd says: {ldd}"
    );
    assert!(kiln_agent::is_static_elf(&path));
    // The dynamically linked test build is not static: the check tells them apart.
    assert!(!kiln_agent::is_static_elf(Path::new(common::AGENT)));
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "static kiln-agent: {} bytes ({:.2} MiB)",
        size,
        size as f64 / 1048576.0
    );
    assert!(size < 4 << 20, "the static agent grew to {size} bytes");

    // locate_binary honours KILN_AGENT_BIN (the only test in this binary touches the env).
    std::env::set_var("KILN_AGENT_BIN", &path);
    assert_eq!(kiln_agent::locate_binary().as_deref(), Some(path.as_path()));
    std::env::set_var("KILN_AGENT_BIN", "/nonexistent/kiln-agent");
    assert_eq!(kiln_agent::locate_binary(), None);
    std::env::remove_var("KILN_AGENT_BIN");

    // It serves: hello, exec, a file round trip, and a user switch that reads /etc/passwd
    // itself (a static glibc cannot use NSS).
    let a = Agent::start_bin(&path, &[]);
    let mut c = a.client();
    assert!(c.hello().ready);
    let out = c
        .exec_output(&ExecRequest::argv(["echo", "static"]))
        .unwrap();
    assert_eq!(out.stdout, b"static\n");
    let src = a.path("in");
    std::fs::write(&src, b"payload").unwrap();
    let dest = a.path("out");
    c.put_file(&src, dest.to_str().unwrap(), &PutOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
    if common::is_root() {
        let out = c
            .exec_output(&ExecRequest::argv(["id", "-un"]).user("nobody"))
            .unwrap();
        assert_eq!(out.stdout, b"nobody\n");
    } else {
        kiln_e2e::skip("user switch part needs root");
    }
}
