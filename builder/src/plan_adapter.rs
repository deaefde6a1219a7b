//! From the manifest's validated [`Plan`] to the builder's [`BuildJob`]: reads the local files
//! the plan refers to (`scriptFrom`, `file.source`) and converts units.

use std::collections::BTreeMap;
use std::path::Path;

use crate::job::{
    self, BootstrapSpec, BuildJob, DiskJob, FileContent, SourceSpec, StepKind, VmJob,
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
    #[error("VM `{vm}`: {what} is not supported by `kiln build` yet")]
    Unsupported { vm: String, what: String },
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
        if !vm.boot_command.is_empty() {
            return Err(AdaptError::Unsupported {
                vm: vm.name.clone(),
                what: "bootCommand".into(),
            });
        }
        if !vm.isos.is_empty() {
            return Err(AdaptError::Unsupported {
                vm: vm.name.clone(),
                what: "isos".into(),
            });
        }
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
            } => SourceSpec::Bootstrap(BootstrapSpec {
                distro: distro.clone(),
                suite: suite.clone(),
                packages: packages.clone(),
                mirror: mirror.clone(),
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
                .map(|d| DiskJob {
                    name: d.name.clone(),
                    size_bytes: d.size,
                })
                .collect(),
            cloud_init: vm.cloud_init.as_ref().map(|c| job::CloudInit {
                user_data: c.user_data.clone(),
                network_data: c.network_data.clone(),
            }),
            steps,
            clean_for_template: true,
            internet: vm
                .nics
                .iter()
                .any(|n| plan.build.network.vpc(&n.vpc).is_some_and(|v| v.internet)),
        });
    }
    Ok(BuildJob {
        name: plan.module.clone(),
        manifest_path: manifest_path.to_path_buf(),
        manifest_text: manifest_text.to_string(),
        vms,
        files,
        timeout: plan.timeout,
        retries: plan.retries,
    })
}
