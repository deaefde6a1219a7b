//! The Plan other parts of kiln consume: defaults, resolved references and the build/base
//! views, checked through the public API.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use kiln_builder::manifest::{
    load, load_str, BootEvent, CommunicatorKind, DiskBus, FileContent, Limits, NicModel, Plan,
    ScriptSource, Shell, Source, Step,
};

fn plan(text: &str) -> Plan {
    let l = load_str(text, Path::new("dir/mod-one.yaml"), Limits::default());
    match l.plan {
        Some(p) => p,
        None => panic!("invalid: {:#?}", l.diagnostics),
    }
}

#[test]
fn defaults_are_applied() {
    let p = plan("vms:\n  - name: a\n    source: {bootstrap: {distro: debian, suite: bookworm}}\n    resources: {cpu: \"1500m\", memory: 1Gi}\n    provisioners:\n      - type: reboot\n      - type: shell\n        shell: {inline: \"true\"}\n");
    assert_eq!(p.module, "mod-one");
    assert_eq!(p.timeout, Duration::from_secs(1800));
    assert_eq!(p.retries, 0);
    assert_eq!(p.iso_cache_ttl, Duration::from_secs(86400));
    let vm = &p.build.vms[0];
    assert_eq!(vm.cpus, 2);
    assert_eq!(vm.memory, 1 << 30);
    assert_eq!(vm.disks.len(), 1);
    assert_eq!(
        (vm.disks[0].size, vm.disks[0].bus),
        (20 << 30, DiskBus::Virtio)
    );
    assert_eq!(vm.communicator.kind, CommunicatorKind::Agent);
    assert_eq!(vm.communicator.shell, Shell::Bash);
    assert_eq!(vm.communicator.ssh_username, "root");
    assert_eq!(vm.communicator.ssh_port, 22);
    assert_eq!(vm.communicator.ssh_timeout, Duration::from_secs(300));
    assert!(vm.cloud_init.is_none() && vm.efi.is_none() && !vm.invisible);
    assert_eq!(vm.provisioners[0].name, "reboot-1");
    assert_eq!(
        vm.provisioners[0].step,
        Step::Reboot {
            command: "reboot".into()
        }
    );
    assert_eq!(vm.provisioners[1].step_timeout, Duration::from_secs(1800));
    // The implicit network: VPC `default` with internet, subnet `default`, one NIC on it.
    let net = &p.build.network;
    assert_eq!(net.vpcs.len(), 1);
    assert!(net.vpcs[0].internet);
    assert_eq!(net.subnets[0].cidr.to_string(), "10.0.2.0/24");
    assert_eq!(net.subnets[0].gateway, Ipv4Addr::new(10, 0, 2, 1));
    assert_eq!(vm.nics.len(), 1);
    assert_eq!(
        (vm.nics[0].slot, vm.nics[0].subnet.as_str()),
        (1, "default")
    );
    assert!(vm.nics[0].mac.starts_with("02:6b:6c:"));
    assert_eq!(p.build, p.base);
}

#[test]
fn overrides_change_the_build_and_keep_the_base() {
    let text = r#"
network:
  vpcs: [{name: lab}]
  subnets:
    - {name: lan, vpc: lab, cidr: 10.1.0.0/24}
    - {name: wan, vpc: lab, cidr: 10.2.0.0/24}
buildOverrides:
  vpcs: [{name: lab, internet: true}]
  subnets: [{name: wan, unmanaged: true}]
  vms:
    - name: a
      resources: {cpu: 4}
      nics:
        - {name: eth0, subnet: lan, ip: 10.1.0.9}
        - {name: up, subnet: wan}
files:
  - {name: f.cfg, inline: "x\n"}
vms:
  - name: a
    source: {blank: true}
    resources: {cpu: 1, memory: 1Gi}
    isos: [{url: "https://m.example.org/i.iso"}]
    floppy: {files: [{name: f.cfg}]}
    nics:
      - {name: eth0, subnet: lan, slot: 4, mac: "52:54:00:00:00:01", model: virtio}
"#;
    let p = plan(text);
    let (b, c) = (&p.build.vms[0], &p.base.vms[0]);
    assert_eq!((b.cpus, c.cpus), (4, 1));
    assert_eq!(b.memory, c.memory);
    // Same-named override NIC keeps mac, slot and model; the new NIC takes the lowest free slot.
    assert_eq!(b.nics[0].mac, "52:54:00:00:00:01");
    assert_eq!(b.nics[0].slot, 4);
    assert_eq!(b.nics[0].model, NicModel::Virtio);
    assert_eq!(b.nics[0].ip, Some(Ipv4Addr::new(10, 1, 0, 9)));
    assert_eq!(b.nics[1].slot, 1);
    assert_eq!(c.nics.len(), 1);
    assert_eq!(c.nics[0].ip, None);
    assert!(p.build.network.vpc("lab").is_some_and(|v| v.internet));
    assert!(p.base.network.vpc("lab").is_some_and(|v| !v.internet));
    let (bw, cw) = (
        p.build.network.subnet("wan").unwrap(),
        p.base.network.subnet("wan").unwrap(),
    );
    assert!(bw.unmanaged && !bw.dhcp && bw.gateway == Ipv4Addr::new(10, 2, 0, 253));
    assert!(!cw.unmanaged && cw.dhcp && cw.gateway == Ipv4Addr::new(10, 2, 0, 1));
    // The floppy is build-only.
    assert_eq!(b.floppy_files, vec!["f.cfg".to_string()]);
    assert!(c.floppy_files.is_empty());
    assert_eq!(b.source, Source::Blank);
}

#[test]
fn references_resolve_to_contents_and_paths() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    let p = load(&dir.join("valid-all-fields.yaml"))
        .expect("readable")
        .into_plan()
        .expect("valid");
    let vm = p.build.vm("server").expect("server");
    match &vm.provisioners[0].step {
        Step::File {
            content,
            destination,
        } => {
            assert_eq!(content, &FileContent::Inline("lab image\n".into()));
            assert_eq!(destination, "/etc/motd");
        }
        other => panic!("{other:?}"),
    }
    match &vm.provisioners[1].step {
        Step::File {
            content: FileContent::Path(p),
            ..
        } => assert!(p.ends_with("assets/configs/motd")),
        other => panic!("{other:?}"),
    }
    match &vm.provisioners[2].step {
        Step::Shell {
            script: ScriptSource::Path(p),
            env,
            execute_command,
        } => {
            assert!(p.ends_with("assets/setup.sh"));
            assert_eq!(env.get("LEVEL").map(String::as_str), Some("3"));
            assert!(execute_command
                .as_deref()
                .is_some_and(|e| e.contains("{{ .Command }}")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.communicator.ssh_timeout, Duration::from_secs(600));
    assert_eq!(
        vm.disks.iter().map(|d| d.bus).collect::<Vec<_>>(),
        [DiskBus::Virtio, DiskBus::Virtio, DiskBus::Virtio]
    );
    assert!(matches!(&vm.source, Source::Url { sha256: Some(h), .. } if h.len() == 64));
    assert!(vm.boot_command.contains(&BootEvent::HttpIp));
    assert_eq!(p.http_directory, vec!["preseed.cfg".to_string()]);
    let client = p.build.vm("client").expect("client");
    assert_eq!(
        client.source,
        Source::BuildRef {
            name: "lab-base".into(),
            namespace: None,
            vm_name: Some("router".into())
        }
    );
    assert!(client
        .cloud_init
        .as_ref()
        .is_some_and(|c| c.user_data_from.is_some()));
}

#[test]
fn examples_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["hello", "layered", "pair"] {
        let l = load(&root.join(format!("{name}.yaml"))).expect("readable");
        assert!(l.diagnostics.is_empty(), "{name}: {:#?}", l.diagnostics);
        assert_eq!(l.plan.expect("valid").module, name);
    }
    let pair = load(&root.join("pair.yaml"))
        .expect("read")
        .into_plan()
        .expect("valid");
    let names: Vec<&str> = pair.vms().iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["web", "client"]);
    assert!(
        matches!(&pair.vms()[0].source, Source::Bootstrap { packages, .. } if packages == &["busybox"])
    );
}

/// Every key `kiln plan --json` can print, for every valid manifest of the corpus and the
/// examples, is camelCase like the manifest's own: one key style in every JSON kiln writes.
#[test]
fn plan_json_keys_are_camel_case() {
    fn walk(v: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    // Keys the user chose (env names, file names) are data, not style.
                    let data = at.ends_with(".env") || at.ends_with(".files");
                    if !data && k.contains(['_', '-']) {
                        bad.push(format!("{at}.{k}"));
                    }
                    walk(v, &format!("{at}.{k}"), bad);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{at}[{i}]"), bad);
                }
            }
            _ => {}
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(dir.join("tests/manifests"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("valid-"))
        })
        .collect();
    for name in ["hello", "layered", "pair"] {
        files.push(dir.join(format!("../examples/{name}.yaml")));
    }
    let mut bad = Vec::new();
    for f in &files {
        let Some(plan) = load(f).expect("readable").plan else {
            continue;
        };
        walk(
            &serde_json::to_value(&plan).unwrap(),
            &f.file_name().unwrap().to_string_lossy(),
            &mut bad,
        );
    }
    assert!(files.len() > 10);
    assert!(bad.is_empty(), "keys not in camelCase: {bad:#?}");
}

#[test]
fn host_access_is_off_unless_a_vpc_opts_in() {
    let p = plan(
        "network:\n  vpcs:\n    - {name: lab, internet: true, hostAccess: true}\n    - {name: dmz, internet: true}\n  subnets:\n    - {name: a, vpc: lab, cidr: 10.1.0.0/24}\n    - {name: b, vpc: dmz, cidr: 10.2.0.0/24}\n    - {name: c, cidr: 10.3.0.0/24}\nvms:\n  - name: x\n    source: {blank: true}\n    resources: {cpu: 1, memory: 1Gi}\n",
    );
    let vpc = |n: &str| p.build.network.vpc(n).unwrap().host_access;
    assert!(vpc("lab"));
    assert!(!vpc("dmz"));
    assert!(
        !vpc("default"),
        "the implicit VPC has internet, never host access"
    );
    assert!(p.base.network.vpc("lab").unwrap().host_access);
}

#[test]
fn e1000_nics_take_effect_and_an_override_keeps_the_base_model() {
    let text = r#"
buildOverrides:
  vms:
    - name: a
      nics:
        - {name: eth0, subnet: default, ip: 10.0.2.9}
vms:
  - name: a
    source: {blank: true}
    resources: {cpu: 1, memory: 1Gi}
    nics:
      - {name: eth0, subnet: default, model: e1000}
      - {name: eth1, subnet: default, model: e1000e}
      - {name: eth2, subnet: default, model: virtio}
"#;
    let p = plan(text);
    let models = |nics: &[kiln_builder::manifest::Nic]| -> Vec<NicModel> {
        nics.iter().map(|n| n.model).collect()
    };
    assert_eq!(
        models(&p.base.vms[0].nics),
        [NicModel::E1000, NicModel::E1000e, NicModel::Virtio]
    );
    // The override names eth0 without a model: the build's eth0 is still the base's e1000.
    assert_eq!(models(&p.build.vms[0].nics), [NicModel::E1000]);
    assert_eq!(p.build.vms[0].nics[0].mac, p.base.vms[0].nics[0].mac);
}

#[test]
fn nic_models_kiln_does_not_serve_are_refused_where_written() {
    for model in ["rtl8139", "pcnet", "ne2k_pci"] {
        let text = format!(
            "vms:\n  - name: a\n    source: {{blank: true}}\n    resources: {{cpu: 1, memory: 1Gi}}\n    nics:\n      - {{ name: eth0, subnet: default, model: {model} }}\n"
        );
        let l = load_str(&text, Path::new("m.yaml"), Limits::default());
        assert!(l.plan.is_none(), "{model} was accepted");
        let d: Vec<String> = l.diagnostics.iter().map(|d| d.render()).collect();
        // Line 6, at the model's value.
        let want = format!("m.yaml:6:47: error: NIC model `{model}` is not supported by kiln");
        assert!(
            d.iter().any(|d| d.contains(&want) && d.contains("e1000")),
            "{model}: {d:#?}"
        );
    }
}

#[test]
fn a_bootstrap_kernel_is_carried_and_a_non_kernel_package_refused() {
    let src = |k: &str| {
        format!("vms:\n  - name: a\n    source: {{bootstrap: {{distro: debian, suite: bookworm, kernel: {k}}}}}\n    resources: {{cpu: 1, memory: 1Gi}}\n")
    };
    let p = plan(&src("linux-image-amd64"));
    match &p.build.vms[0].source {
        Source::Bootstrap { kernel, .. } => {
            assert_eq!(kernel.as_deref(), Some("linux-image-amd64"))
        }
        other => panic!("{other:?}"),
    }
    let text = src("nginx");
    let l = load_str(&text, Path::new("m.yaml"), Limits::default());
    assert!(l.plan.is_none());
    let d: Vec<String> = l.diagnostics.iter().map(|d| d.render()).collect();
    assert!(
        d.iter()
            .any(|d| d.contains("m.yaml:3:67: error: `nginx` is not a Debian kernel package")),
        "{d:#?}"
    );
}
