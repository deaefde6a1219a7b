//! From the manifest's validated [`Plan`] to the builder's [`BuildJob`]: reads the local files
//! the plan refers to (`scriptFrom`, `file.source`) and converts units.

use std::collections::BTreeMap;
use std::path::Path;

use crate::job::{
    self, BaseView, BaseVm, BootstrapSpec, BuildJob, CommunicatorJob, DiskBus, DiskJob,
    FileContent, IsoJob, NetJob, NicJob, NicModel, SourceSpec, SshJob, StepKind, StepShell,
    SubnetJob, VmJob, VpcJob,
};
use crate::manifest::{self, Plan};

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error("VM `{vm}` step '{step}': reading {path}: {source}")]
    Read {
        vm: String,
        step: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file `{name}`: reading {path}: {source}")]
    File {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM `{vm}`: reading cloudInit.userDataFrom {path}: {source}")]
    UserData {
        vm: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM `{vm}`: NIC `{nic}`: {source}")]
    Mac {
        vm: String,
        nic: String,
        #[source]
        source: crate::mac::MacError,
    },
    #[error("VM `{vm}`: {what} is not supported by `kiln build` yet")]
    Unsupported { vm: String, what: String },
}

/// Why a manifest file gave no job. Each variant shows its cause's text unchanged: the CLI
/// and the editor print it as they printed the cause itself.
#[derive(Debug, thiserror::Error)]
pub enum LoadJobError {
    #[error(transparent)]
    Manifest(#[from] manifest::LoadError),
    #[error(transparent)]
    Adapt(#[from] AdaptError),
}

impl LoadJobError {
    /// The manifest's errors with their places, when it was read but is invalid.
    pub fn diagnostics(&self) -> Option<&[manifest::Diagnostic]> {
        match self {
            LoadJobError::Manifest(manifest::LoadError::Invalid { diagnostics, .. }) => {
                Some(diagnostics)
            }
            _ => None,
        }
    }
}

/// Reads the manifest file at `path` once, validates it and makes its job: what `kiln build`
/// and the editor's Build both start from. `on_warning` sees each warning, also when the
/// manifest has errors.
pub fn load_job(
    path: &Path,
    on_warning: &mut dyn FnMut(&manifest::Diagnostic),
) -> Result<BuildJob, LoadJobError> {
    let (loaded, text) = manifest::load_file(path, manifest::Limits::from_env())?;
    loaded.warnings().for_each(&mut *on_warning);
    let plan = loaded.into_plan()?;
    // A plan is only made from text that was read whole.
    let text = text.unwrap_or_default();
    Ok(job_from_plan(&plan, path, &text)?)
}

/// SSH where the VM asks for it and kiln cannot put its agent into the guest (the rule is
/// [`manifest::Vm::over_ssh`]): an ISO install (`blank`), or an image without a cloud-init seed.
/// Elsewhere validation refuses `type: ssh`, so the agent is what the manifest says.
fn communicator(vm: &manifest::Vm) -> CommunicatorJob {
    if !vm.over_ssh() {
        return CommunicatorJob::Agent;
    }
    let c = &vm.communicator;
    CommunicatorJob::Ssh(SshJob {
        username: c.ssh_username.clone(),
        port: c.ssh_port,
        password: c.ssh_password.clone(),
        private_key: c.ssh_private_key.clone(),
        shell: match c.shell {
            manifest::Shell::Bash => StepShell::Bash,
            manifest::Shell::Sh => StepShell::Sh,
            manifest::Shell::Powershell => StepShell::Powershell,
            manifest::Shell::Cmd => StepShell::Cmd,
        },
    })
}

/// Builds the job for `plan`, read from `manifest_path` with text `manifest_text`.
pub fn job_from_plan(
    plan: &Plan,
    manifest_path: &Path,
    manifest_text: &str,
) -> Result<BuildJob, AdaptError> {
    let mut files = BTreeMap::new();
    for f in &plan.files {
        let c = match &f.content {
            manifest::FileContent::Inline(s) => FileContent::Inline(s.clone()),
            manifest::FileContent::Url(u) => FileContent::Url(u.clone()),
            manifest::FileContent::Path(p) => {
                FileContent::Inline(std::fs::read_to_string(p).map_err(|source| {
                    AdaptError::File {
                        name: f.name.clone(),
                        path: p.clone(),
                        source,
                    }
                })?)
            }
        };
        files.insert(f.name.clone(), c);
    }
    let mut vms = Vec::new();
    for vm in plan.vms() {
        let source = match &vm.source {
            manifest::Source::Url { url, sha256 } => SourceSpec::Url {
                url: url.clone(),
                sha256: sha256.clone(),
            },
            manifest::Source::File { path } => SourceSpec::File { path: path.clone() },
            manifest::Source::Bootstrap {
                distro,
                suite,
                packages,
                mirror,
                kernel,
            } => SourceSpec::Bootstrap(BootstrapSpec {
                distro: distro.clone(),
                suite: suite.clone(),
                packages: packages.clone(),
                mirror: mirror.clone(),
                kernel: kernel.clone(),
            }),
            manifest::Source::BuildRef { name, vm_name, .. } => SourceSpec::BuildRef {
                module: name.clone(),
                vm: vm_name.clone(),
            },
            manifest::Source::Blank => SourceSpec::Blank,
        };
        let mut steps = Vec::new();
        for p in &vm.provisioners {
            let kind = match &p.step {
                manifest::Step::Shell {
                    script,
                    env,
                    execute_command,
                } => StepKind::Shell {
                    inline: match script {
                        manifest::ScriptSource::Inline(s) => s.clone(),
                        manifest::ScriptSource::Path(path) => std::fs::read_to_string(path)
                            .map_err(|source| AdaptError::Read {
                                vm: vm.name.clone(),
                                step: p.name.clone(),
                                path: path.clone(),
                                source,
                            })?,
                    },
                    env: env.clone(),
                    execute_command: execute_command.clone(),
                },
                manifest::Step::File {
                    content,
                    destination,
                } => {
                    // Steps carry their content inline; give it a private name in `files`.
                    let key = format!("\0step:{}:{}", vm.name, steps.len());
                    let c = match content {
                        manifest::FileContent::Inline(s) => FileContent::Inline(s.clone()),
                        manifest::FileContent::Url(u) => FileContent::Url(u.clone()),
                        manifest::FileContent::Path(path) => FileContent::Inline(
                            std::fs::read_to_string(path).map_err(|source| AdaptError::Read {
                                vm: vm.name.clone(),
                                step: p.name.clone(),
                                path: path.clone(),
                                source,
                            })?,
                        ),
                    };
                    files.insert(key.clone(), c);
                    StepKind::File {
                        file: key,
                        destination: destination.clone(),
                    }
                }
                manifest::Step::Reboot { command } => StepKind::Reboot {
                    // The shell's default reboot goes through the agent's own reboot request.
                    command: (command != "reboot").then(|| command.clone()),
                },
                manifest::Step::Handbuild { instructions } => StepKind::Handbuild {
                    instructions: instructions.clone(),
                },
            };
            steps.push(job::Step {
                name: p.name.clone(),
                timeout: Some(p.step_timeout),
                cache: p.cache,
                kind,
            });
        }
        vms.push(VmJob {
            name: vm.name.clone(),
            source,
            cpus: vm.cpus,
            memory_mib: vm.memory.div_ceil(1 << 20),
            disks: vm
                .disks
                .iter()
                .map(|d| {
                    Ok(DiskJob {
                        name: d.name.clone(),
                        size_bytes: d.size,
                        bus: match d.bus {
                            manifest::DiskBus::Virtio => DiskBus::Virtio,
                            manifest::DiskBus::Scsi => DiskBus::Scsi,
                            manifest::DiskBus::Sata => DiskBus::Sata,
                            // Refused when the manifest is validated; refused here too rather
                            // than silently given another bus.
                            manifest::DiskBus::Usb => {
                                return Err(AdaptError::Unsupported {
                                    vm: vm.name.clone(),
                                    what: format!("disk `{}` on bus `usb`", d.name),
                                })
                            }
                        },
                    })
                })
                .collect::<Result<_, _>>()?,
            cloud_init: match &vm.cloud_init {
                Some(c) => Some(job::CloudInit {
                    user_data: match &c.user_data_from {
                        Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                            AdaptError::UserData {
                                vm: vm.name.clone(),
                                path: path.clone(),
                                source,
                            }
                        })?),
                        None => c.user_data.clone(),
                    },
                    network_data: c.network_data.clone(),
                }),
                None => None,
            },
            steps,
            clean_for_template: true,
            internet: vm
                .nics
                .iter()
                .any(|n| plan.build.network.vpc(&n.vpc).is_some_and(|v| v.internet)),
            nics: nics(vm)?,
            boot_timeout: vm.communicator.ssh_timeout,
            firmware: match vm.efi {
                None => job::Firmware::Bios,
                Some(manifest::Efi { secure_boot: false }) => job::Firmware::Uefi,
                Some(manifest::Efi { secure_boot: true }) => job::Firmware::UefiSecureBoot,
            },
            boot: match vm.boot {
                manifest::Boot::Auto => job::BootChoice::Auto,
                manifest::Boot::Direct => job::BootChoice::Direct,
                manifest::Boot::Firmware => job::BootChoice::Firmware,
            },
            isos: vm
                .isos
                .iter()
                .map(|i| IsoJob {
                    url: i.url.clone(),
                    sha256: i.sha256.clone(),
                })
                .collect(),
            floppy_files: vm.floppy_files.clone(),
            boot_command: vm.boot_command.clone(),
            boot_wait: vm.boot_wait,
            boot_key_interval: vm.boot_key_interval,
            communicator: communicator(vm),
            invisible: vm.invisible,
        });
    }
    Ok(BuildJob {
        name: plan.module.clone(),
        manifest_path: manifest_path.to_path_buf(),
        manifest_text: manifest_text.to_string(),
        vms,
        files,
        http_directory: plan.http_directory.clone(),
        timeout: plan.timeout,
        retries: plan.retries,
        iso_cache_ttl: plan.iso_cache_ttl,
        network: net(&plan.build.network),
        base: BaseView {
            network: net(&plan.base.network),
            vms: plan
                .base
                .vms
                .iter()
                .map(|v| {
                    Ok(BaseVm {
                        name: v.name.clone(),
                        cpus: v.cpus,
                        memory_mib: v.memory.div_ceil(1 << 20),
                        nics: nics(v)?,
                    })
                })
                .collect::<Result<_, AdaptError>>()?,
        },
    })
}

/// A view's network as the builder's [`NetJob`].
fn net(n: &manifest::Network) -> NetJob {
    NetJob {
        vpcs: n
            .vpcs
            .iter()
            .map(|v| VpcJob {
                name: v.name.clone(),
                internet: v.internet,
                host_access: v.host_access,
            })
            .collect(),
        subnets: n
            .subnets
            .iter()
            .map(|s| SubnetJob {
                name: s.name.clone(),
                vpc: s.vpc.clone(),
                cidr: s.cidr,
                dhcp: s.dhcp,
                unmanaged: s.unmanaged,
                dns: s.dns.clone(),
            })
            .collect(),
    }
}

/// A VM's NICs in slot order (the order the guest enumerates them).
fn nics(vm: &manifest::Vm) -> Result<Vec<NicJob>, AdaptError> {
    let mut v: Vec<_> = vm.nics.iter().collect();
    v.sort_by_key(|n| n.slot);
    v.into_iter()
        .map(|n| {
            Ok(NicJob {
                name: n.name.clone(),
                subnet: n.subnet.clone(),
                // The plan keeps the MAC as the text it validated: this is its one conversion.
                mac: n.mac.parse().map_err(|source| AdaptError::Mac {
                    vm: vm.name.clone(),
                    nic: n.name.clone(),
                    source,
                })?,
                ip: n.ip,
                model: match n.model {
                    manifest::NicModel::Virtio => NicModel::Virtio,
                    manifest::NicModel::E1000 => NicModel::E1000,
                    manifest::NicModel::E1000e => NicModel::E1000e,
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MANIFEST: &str = "vms:
  - name: a
    source: { bootstrap: { distro: debian, suite: bookworm, packages: [] } }
    resources: { cpu: 1, memory: 512Mi }
    nics:
      - { name: eth1, subnet: lab, slot: 2 }
      - { name: eth0, subnet: lab, slot: 1, ip: 10.9.0.10 }
network:
  vpcs: [{ name: lab, internet: false }]
  subnets: [{ name: lab, vpc: lab, cidr: 10.9.0.0/24 }]
buildOverrides:
  vpcs: [{ name: lab, internet: true }]
  vms:
    - name: a
      resources: { cpu: 2, memory: 1Gi }
      nics: [{ name: eth0, subnet: lab }]
";

    #[test]
    fn http_directory_is_carried_and_what_builds_cannot_do_is_refused() {
        let with = |extra_vm: &str, extra_top: &str| {
            format!(
                "vms:\n  - name: a\n    source: {{ bootstrap: {{ distro: debian, suite: bookworm, packages: [] }} }}\n    resources: {{ cpu: 1, memory: 512Mi }}\n{extra_vm}files:\n  - {{ name: f.txt, inline: hi }}\n{extra_top}"
            )
        };
        let job = |text: &str| {
            let plan = manifest::load_str(text, Path::new("m.yaml"), Default::default())
                .into_plan()
                .unwrap();
            job_from_plan(&plan, Path::new("m.yaml"), text)
        };
        let j = job(&with("", "httpDirectory: { files: [{ name: f.txt }] }\n")).unwrap();
        assert_eq!(j.http_directory, ["f.txt"]);
        // A boot command is typed, paced by bootWait and bootKeyInterval (Packer's defaults).
        let j = job(&with("    bootCommand: [\"<enter>\"]\n", "")).unwrap();
        assert_eq!(j.vms[0].boot_command.len(), 1);
        assert_eq!(j.vms[0].boot_wait, std::time::Duration::from_secs(10));
        assert_eq!(
            j.vms[0].boot_key_interval,
            std::time::Duration::from_millis(100)
        );
        let j = job(&with(
            "    bootCommand: [\"<enter>\"]\n    bootWait: 2s\n    bootKeyInterval: 20ms\n",
            "",
        ))
        .unwrap();
        assert_eq!(j.vms[0].boot_wait, std::time::Duration::from_secs(2));
        assert_eq!(
            j.vms[0].boot_key_interval,
            std::time::Duration::from_millis(20)
        );
        // An ISO install: a blank disk, its ISOs and a floppy reach the job.
        let iso = "vms:\n  - name: a\n    source: { blank: true }\n    resources: { cpu: 1, memory: 512Mi }\n    isos: [{ url: http://127.0.0.1/i.iso }]\n    floppy: { files: [{ name: f.txt }] }\nfiles:\n  - { name: f.txt, inline: hi }\n";
        let plan = manifest::load_str(iso, Path::new("m.yaml"), Default::default());
        assert_eq!(plan.warnings().count(), 0);
        let j = job(iso).unwrap();
        assert_eq!(j.vms[0].source, SourceSpec::Blank);
        assert_eq!(j.vms[0].isos[0].url, "http://127.0.0.1/i.iso");
        assert_eq!(j.vms[0].floppy_files, ["f.txt"]);
    }

    #[test]
    fn efi_firmware_and_the_boot_field_reach_the_job() {
        let vm = |name: &str, extra: &str| {
            format!("  - name: {name}\n    source: {{ url: http://127.0.0.1/x.qcow2 }}\n    cloudInit: {{}}\n    resources: {{ cpu: 1, memory: 512Mi }}\n{extra}")
        };
        let text = format!(
            "vms:\n{}{}{}{}",
            vm("a", ""),
            vm("b", "    efiFirmware: {}\n    boot: direct\n"),
            vm("c", "    efiFirmware: { secureBoot: true }\n"),
            vm("d", "    boot: firmware\n"),
        );
        let path = Path::new("m.yaml");
        let plan = manifest::load_str(&text, path, Default::default())
            .into_plan()
            .unwrap();
        let job = job_from_plan(&plan, path, &text).unwrap();
        let got: Vec<_> = job.vms.iter().map(|v| (v.firmware, v.boot)).collect();
        use job::{BootChoice as B, Firmware as F};
        assert_eq!(
            got,
            [
                (F::Bios, B::Auto),
                (F::Uefi, B::Direct),
                (F::UefiSecureBoot, B::Auto),
                (F::Bios, B::Firmware)
            ]
        );
    }

    #[test]
    fn user_data_from_reaches_the_seed_and_ssh_timeout_the_boot_wait() {
        let d = tempfile::tempdir().unwrap();
        let cfg = "#cloud-config\nwrite_files:\n  - path: /etc/from-a-file\n    content: hi\n";
        std::fs::create_dir(d.path().join("ci")).unwrap();
        std::fs::write(d.path().join("ci/user-data.yaml"), cfg).unwrap();
        let text = "vms:\n  - name: a\n    source: { bootstrap: { distro: debian, suite: bookworm } }\n    resources: { cpu: 1, memory: 512Mi }\n    communicator: { sshTimeout: 90s }\n    cloudInit:\n      userDataFrom: { secretRef: { name: ci, key: user-data.yaml } }\n  - name: b\n    source: { bootstrap: { distro: debian, suite: bookworm } }\n    resources: { cpu: 1, memory: 512Mi }\n";
        let path = d.path().join("m.yaml");
        let plan = manifest::load_str(text, &path, Default::default())
            .into_plan()
            .unwrap();
        let job = job_from_plan(&plan, &path, text).unwrap();
        let ci = job.vms[0].cloud_init.as_ref().expect("a seed");
        assert_eq!(ci.user_data.as_deref(), Some(cfg));
        let seed = crate::sources::seed::files("a", ci);
        assert!(
            seed.user_data.contains("path: /etc/from-a-file"),
            "{}",
            seed.user_data
        );
        assert!(
            seed.user_data.contains("kiln-agent"),
            "kiln's part is there too"
        );
        assert_eq!(job.vms[0].boot_timeout, std::time::Duration::from_secs(90));
        assert_eq!(job.vms[1].boot_timeout, std::time::Duration::from_secs(300));
        // The file is read when the build starts: one gone by then is named.
        std::fs::remove_file(d.path().join("ci/user-data.yaml")).unwrap();
        let e = job_from_plan(&plan, &path, text).unwrap_err();
        assert!(matches!(e, AdaptError::UserData { .. }), "{e}");
        assert!(e.to_string().contains("user-data.yaml"), "{e}");
    }

    #[test]
    fn type_ssh_goes_over_ssh_exactly_where_no_agent_can_be_put_in() {
        // For each source, what `type: ssh` with a password gives: the build over SSH; the
        // agent with a warning on the login (RudderVirt's Existing Image and Disk Image URL
        // shapes, which must build unchanged); or an error (kiln's own bootstrap source).
        #[derive(Debug, PartialEq)]
        enum Outcome {
            Ssh,
            AgentWarned,
            Refused,
        }
        let cases = [
            ("{ blank: true }", "", Outcome::Ssh),
            ("{ url: http://127.0.0.1/x.qcow2 }", "", Outcome::Ssh),
            (
                "{ url: http://127.0.0.1/x.qcow2 }",
                "    cloudInit: {}\n",
                Outcome::AgentWarned,
            ),
            (
                "{ bootstrap: { distro: debian, suite: bookworm } }",
                "",
                Outcome::Refused,
            ),
            ("{ buildRef: { name: base } }", "", Outcome::AgentWarned),
        ];
        for (source, extra, want) in cases {
            let text = format!("vms:\n  - name: a\n    source: {source}\n    resources: {{ cpu: 1, memory: 512Mi }}\n    communicator: {{ type: ssh, sshPassword: pw }}\n{extra}");
            let path = Path::new("m.yaml");
            let loaded = manifest::load_str(&text, path, Default::default());
            let warned = loaded
                .warnings()
                .any(|d| d.message.contains("`sshPassword` has no effect"));
            let got = match &loaded.plan {
                None => Outcome::Refused,
                Some(plan) => {
                    let job = job_from_plan(plan, path, &text).unwrap();
                    match (&job.vms[0].communicator, warned) {
                        (CommunicatorJob::Ssh(_), false) => Outcome::Ssh,
                        (CommunicatorJob::Agent, true) => Outcome::AgentWarned,
                        (c, w) => panic!("{source} {extra}: {c:?}, warned: {w}"),
                    }
                }
            };
            assert_eq!(got, want, "{source} {extra}: {:?}", loaded.diagnostics);
        }
    }

    #[test]
    fn build_network_has_overrides_and_base_view_does_not() {
        let plan = manifest::load_str(MANIFEST, Path::new("m.yaml"), Default::default())
            .into_plan()
            .unwrap();
        let job = job_from_plan(&plan, Path::new("m.yaml"), MANIFEST).unwrap();
        // The build: internet on (override), one override NIC keeping the base NIC's MAC.
        assert!(job.network.vpcs[0].internet);
        assert_eq!(job.network.subnets[0].cidr.to_string(), "10.9.0.0/24");
        let vm = &job.vms[0];
        assert_eq!((vm.cpus, vm.memory_mib), (2, 1024));
        assert_eq!(vm.nics.len(), 1);
        assert!(vm.internet);
        // Clones: no internet, both NICs in slot order, base resources.
        assert!(!job.base.network.vpcs[0].internet);
        let b = job.base.vm("a").unwrap();
        assert_eq!((b.cpus, b.memory_mib), (1, 512));
        let names: Vec<_> = b.nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        assert_eq!(b.nics[0].ip, Some("10.9.0.10".parse().unwrap()));
        assert_eq!(
            vm.nics[0].mac, b.nics[0].mac,
            "the override NIC keeps its MAC"
        );
        assert!(crate::mac::Mac::new(b.nics[0].mac.bytes()).is_ok());
        // base.yaml round-trips.
        let y = serde_saphyr::to_string(&job.base).unwrap();
        let back: crate::job::BaseView = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, job.base);
    }
}
