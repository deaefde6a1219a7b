//! Manifest throughput: `cargo bench -p kiln-builder --bench manifest`. Prints wall-clock
//! times; not a timed test.

use std::path::Path;
use std::time::Instant;

use kiln_builder::manifest::{fmt, load_str, yaml, Limits};

fn big(vms: usize) -> String {
    let mut s = String::from("network:\n  subnets:\n");
    for n in 0..50 {
        s.push_str(&format!("    - {{name: net{n}, cidr: 10.{n}.0.0/24}}\n"));
    }
    s.push_str("vms:\n");
    for i in 0..vms {
        s.push_str(&format!(
            "  - name: vm{i}\n    source: {{bootstrap: {{distro: debian, suite: bookworm, packages: [curl, nginx]}}}}\n    resources: {{cpu: 1, memory: 1Gi}}\n    nics:\n      - {{name: eth0, subnet: net{}, ip: 10.{}.0.{}}}\n    provisioners:\n      - {{type: shell, shell: {{inline: \"echo hi\"}}}}\n      - {{type: reboot}}\n",
            i % 50,
            i % 50,
            10 + i / 50
        ));
    }
    s
}

fn time<T>(what: &str, runs: u32, mut f: impl FnMut() -> T) {
    let start = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(f());
    }
    let per = start.elapsed() / runs;
    println!("{what}: {per:?} per run ({runs} runs)");
}

fn main() {
    let path = Path::new("bench.yaml");
    let hello = include_str!("../../examples/hello.yaml");
    time("validate examples/hello.yaml", 2000, || {
        load_str(hello, path, Limits::default())
    });
    let text = big(500);
    println!("500-VM manifest: {} bytes", text.len());
    let l = load_str(&text, path, Limits::default());
    assert!(l.plan.is_some(), "{:#?}", l.diagnostics.first());
    time("validate 500-VM manifest", 20, || {
        load_str(&text, path, Limits::default())
    });
    let tree = yaml::parse(&text, Limits::default().yaml).expect("parses");
    time("fmt 500-VM manifest", 20, || fmt::format(&tree, &text));
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..30 {
        let p = format!("*a{}", i - 1);
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
    }
    time("reject a 10^30-node alias bomb", 200, || {
        load_str(&bomb, path, Limits::default())
    });
    let deep = format!("vms: {}", "[".repeat(1 << 20));
    time("reject 1 MiB of nested `[`", 20, || {
        load_str(&deep, path, Limits::default())
    });
}
