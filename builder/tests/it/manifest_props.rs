//! Property tests: `kiln fmt` of any valid manifest validates and yields the same Plan, and
//! formatting is idempotent. Manifests are generated with random shapes and random YAML
//! styles (flow or block collections, plain, single- or double-quoted and literal scalars).

use std::path::{Path, PathBuf};

use kiln_builder::manifest::{fmt, load_str, yaml, Limits};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Gen {
    vms: Vec<GenVm>,
    files: Vec<String>,
    subnets: u8,
    timeout_min: u32,
    envelope: bool,
    override_first: bool,
    flow: Vec<bool>,
    quote: Vec<u8>,
}

#[derive(Debug, Clone)]
struct GenVm {
    source: u8,
    cpu: u32,
    cpu_millis: bool,
    memory_mi: u32,
    disks: u8,
    nics: u8,
    scripts: Vec<String>,
    file_steps: u8,
    boot: Vec<String>,
    invisible: Option<bool>,
}

fn text() -> impl Strategy<Value = String> {
    // Awkward text for YAML: indicators, quotes, colons, comments, unicode, newlines.
    prop::collection::vec(
        prop_oneof![
            "[a-zA-Z0-9 ]{1,8}",
            Just(": ".to_string()),
            Just(" #".to_string()),
            Just("\"".to_string()),
            Just("'".to_string()),
            Just("\n".to_string()),
            Just("\t".to_string()),
            Just("- ".to_string()),
            Just("{{ .Command }}".to_string()),
            Just("é✓".to_string()),
            Just("\\".to_string()),
            Just("[x]".to_string()),
        ],
        1..8,
    )
    .prop_map(|v| v.concat())
}

fn gen_vm() -> impl Strategy<Value = GenVm> {
    (
        (0u8..4, 1u32..8, any::<bool>(), 64u32..4096, 0u8..4, 0u8..4),
        (
            prop::collection::vec(text(), 0..3),
            0u8..3,
            prop::collection::vec(
                prop_oneof![
                    Just("<enter>"),
                    Just("<wait5>"),
                    Just("abc "),
                    Just("<leftCtrlOn>x<leftCtrlOff>"),
                    Just("{{ .HTTPIP }}")
                ],
                0..4,
            ),
            // `invisible: true` is refused (not supported yet); `false` is accepted.
            prop::option::of(Just(false)),
        ),
    )
        .prop_map(
            |(
                (source, cpu, cpu_millis, memory_mi, disks, nics),
                (scripts, file_steps, boot, invisible),
            )| GenVm {
                source,
                cpu,
                cpu_millis,
                memory_mi,
                disks,
                nics,
                scripts,
                file_steps,
                boot: boot.into_iter().map(String::from).collect(),
                invisible,
            },
        )
}

fn gen() -> impl Strategy<Value = Gen> {
    (
        prop::collection::vec(gen_vm(), 1..4),
        prop::collection::vec(text(), 0..3),
        0u8..3,
        1u32..120,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(any::<bool>(), 64),
        prop::collection::vec(0u8..4, 256),
    )
        .prop_map(
            |(vms, files, subnets, timeout_min, envelope, override_first, flow, quote)| Gen {
                vms,
                files,
                subnets,
                timeout_min,
                envelope,
                override_first,
                flow,
                quote,
            },
        )
}

/// Renders the generated model as YAML text, drawing style choices from `flow`/`quote`.
struct Out<'a> {
    s: String,
    g: &'a Gen,
    qi: usize,
}

impl Out<'_> {
    fn style(&mut self) -> u8 {
        let v = self.g.quote[self.qi % self.g.quote.len()];
        self.qi += 1;
        v
    }
    fn flow(&mut self) -> bool {
        let v = self.g.flow[self.qi % self.g.flow.len()];
        self.qi += 1;
        v
    }
    /// A string scalar in some style; `indent` is where literal block lines go.
    fn scalar(&mut self, v: &str, indent: usize) -> String {
        let plain_ok = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-./_".contains(c))
            && v.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '/');
        match self.style() {
            0 if plain_ok => v.to_string(),
            1 if !v.contains('\n') && !v.contains('\t') => format!("'{}'", v.replace('\'', "''")),
            2 if v.ends_with('\n')
                && !v.starts_with([' ', '\t', '\n'])
                && !v.trim_end_matches('\n').contains("\n\n")
                && v.trim_end_matches('\n').len() + 1 == v.len()
                && !v.lines().any(|l| {
                    l.is_empty() || l.ends_with([' ', '\t']) || l.starts_with([' ', '\t'])
                }) =>
            {
                let pad = " ".repeat(indent);
                let body: String = v.lines().map(|l| format!("{pad}{l}\n")).collect();
                format!("|\n{}", body.trim_end_matches('\n'))
            }
            _ => serde_json::to_string(v).unwrap_or_default(),
        }
    }
    fn line(&mut self, indent: usize, text: &str) {
        self.s.push_str(&" ".repeat(indent));
        self.s.push_str(text);
        self.s.push('\n');
    }
}

fn render(g: &Gen) -> String {
    let mut o = Out {
        s: String::new(),
        g,
        qi: 0,
    };
    let base = if g.envelope {
        o.line(0, "apiVersion: build.ruddervirt.io/v1alpha1");
        o.line(0, "kind: VirtualMachineBuild");
        o.line(0, "metadata: {name: generated}");
        o.line(0, "spec:");
        2
    } else {
        0
    };
    o.line(base, &format!("timeout: {}m", g.timeout_min));
    if !g.files.is_empty() {
        o.line(base, "files:");
        for (i, f) in g.files.iter().enumerate() {
            let v = o.scalar(f, base + 6);
            o.line(base + 2, &format!("- name: file{i}.txt"));
            o.line(base + 4, &format!("inline: {v}"));
        }
    }
    if g.subnets > 0 {
        o.line(base, "network:");
        o.line(base + 2, "vpcs: [{name: lab, internet: true}]");
        o.line(base + 2, "subnets:");
        for i in 0..g.subnets {
            if o.flow() {
                o.line(
                    base + 4,
                    &format!("- {{name: net{i}, vpc: lab, cidr: 10.{i}.0.0/24}}"),
                );
            } else {
                o.line(base + 4, &format!("- name: net{i}"));
                o.line(base + 6, "vpc: lab");
                o.line(base + 6, &format!("cidr: \"10.{i}.0.0/24\""));
            }
        }
    }
    if g.override_first {
        o.line(base, "buildOverrides:");
        o.line(base + 2, "vms:");
        o.line(base + 4, "- name: vm0");
        o.line(base + 6, "resources: {memory: 2Gi}");
    }
    o.line(base, "vms:");
    for (i, vm) in g.vms.iter().enumerate() {
        let b = base + 4;
        o.line(base + 2, &format!("- name: vm{i}"));
        let source = match vm.source {
            0 => "{bootstrap: {distro: debian, suite: bookworm, packages: [curl]}}".to_string(),
            1 => "{blank: true}".to_string(),
            2 => "{buildRef: {name: base, vmName: web}}".to_string(),
            _ => "{url: \"https://images.example.org/x.qcow2\"}".to_string(),
        };
        o.line(b, &format!("source: {source}"));
        if vm.source == 3 {
            o.line(b, "cloudInit: {}");
        }
        let cpu = if vm.cpu_millis {
            format!("\"{}m\"", vm.cpu * 500)
        } else {
            vm.cpu.to_string()
        };
        if o.flow() {
            o.line(
                b,
                &format!("resources: {{cpu: {cpu}, memory: {}Mi}}", vm.memory_mi),
            );
        } else {
            o.line(b, "resources:");
            o.line(b + 2, &format!("cpu: {cpu}"));
            o.line(b + 2, &format!("memory: {}Mi", vm.memory_mi));
        }
        if vm.disks > 0 {
            o.line(b, "disks:");
            for d in 0..vm.disks {
                o.line(b + 2, &format!("- {{name: disk{d}, size: {}Gi}}", d + 1));
            }
        }
        if vm.nics > 0 && g.subnets > 0 {
            o.line(b, "nics:");
            for n in 0..vm.nics {
                let subnet = n % g.subnets;
                o.line(b + 2, &format!("- name: eth{n}"));
                o.line(b + 4, &format!("subnet: net{subnet}"));
                o.line(
                    b + 4,
                    &format!("ip: 10.{subnet}.0.{}", 10 + i * 10 + n as usize),
                );
            }
        }
        if let Some(inv) = vm.invisible {
            o.line(b, &format!("invisible: {inv}"));
        }
        if !vm.boot.is_empty() {
            o.line(b, "bootCommand:");
            for c in &vm.boot {
                let v = o.scalar(c, b + 4);
                o.line(b + 2, &format!("- {v}"));
            }
        }
        let steps = vm.scripts.len()
            + if g.files.is_empty() {
                0
            } else {
                vm.file_steps as usize
            };
        if steps > 0 {
            o.line(b, "provisioners:");
            for (k, sc) in vm.scripts.iter().enumerate() {
                let v = o.scalar(sc, b + 8);
                o.line(b + 2, &format!("- name: step{k}"));
                o.line(b + 4, "type: shell");
                o.line(b + 4, "shell:");
                o.line(b + 6, &format!("inline: {v}"));
                o.line(b + 6, &format!("env: {{A: {}, B: \"x y\"}}", k));
            }
            if !g.files.is_empty() {
                for k in 0..vm.file_steps {
                    let f = k as usize % g.files.len();
                    o.line(b + 2, &format!("- {{type: file, file: {{fileRef: file{f}.txt, destination: /tmp/f{k}}}}}"));
                }
            }
        }
    }
    o.s
}

fn check_roundtrip(text: &str, path: &Path) {
    let first = load_str(text, path, Limits::default());
    let plan = first.plan.clone().unwrap_or_else(|| {
        panic!(
            "generated manifest is invalid:\n{text}\n{:#?}",
            first.diagnostics
        )
    });
    let tree = yaml::parse(text, Limits::default().yaml).expect("parses");
    let formatted = fmt::format(&tree, text);
    let second = load_str(&formatted, path, Limits::default());
    assert_eq!(
        second.plan.as_ref(),
        Some(&plan),
        "fmt changed the plan\n--- before\n{text}\n--- after\n{formatted}\n{:#?}",
        second.diagnostics
    );
    let tree2 = yaml::parse(&formatted, Limits::default().yaml).expect("formatted parses");
    assert_eq!(
        fmt::format(&tree2, &formatted),
        formatted,
        "fmt is not idempotent"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn fmt_keeps_the_plan(g in gen()) {
        let text = render(&g);
        check_roundtrip(&text, Path::new("generated.yaml"));
    }
}

#[test]
fn fmt_keeps_the_plan_of_every_valid_corpus_manifest_and_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("tests/manifests"))
        .expect("corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("valid-") && n.ends_with(".yaml"))
        })
        .collect();
    paths.extend(["hello", "layered", "pair"].map(|n| root.join(format!("../examples/{n}.yaml"))));
    assert!(paths.len() >= 13);
    for p in paths {
        let text = std::fs::read_to_string(&p).expect("read");
        check_roundtrip(&text, &p);
    }
}
