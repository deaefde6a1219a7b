//! What the page shows of a build started from it: [`BuildState`], made from the job before
//! the first event and changed by each event of `kiln build --json`.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Value};

use crate::job::{BuildJob, StepKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A phase reached, with when (milliseconds since the build started).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseMark {
    pub phase: String,
    pub at_ms: u64,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    pub name: String,
    pub kind: String,
    /// `pending`, `running`, `ok` or `failed`.
    pub status: &'static str,
    /// When it started (milliseconds since the build started), for the timeline.
    pub started_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    pub index: usize,
    pub step: String,
    pub instructions: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmState {
    pub name: String,
    pub phase: String,
    pub message: Option<String>,
    pub phases: Vec<PhaseMark>,
    pub steps: Vec<StepState>,
    /// Set while a handbuild step waits for Continue.
    pub paused: Option<Pause>,
    /// The last transfer's progress: `{what, done, total}`.
    pub progress: Option<Value>,
}

/// What the page shows of a build; sent whole on every change (it is small: the log is not in
/// it).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildState {
    pub id: u64,
    pub manifest: String,
    pub module: String,
    pub status: Status,
    pub phase: String,
    pub phases: Vec<PhaseMark>,
    pub vms: Vec<VmState>,
    /// Unix milliseconds.
    pub started_at: u64,
    pub duration_ms: Option<u64>,
    /// Why it failed: the last lines kiln printed.
    pub error: Option<String>,
    /// The module made: `{dir, record}` (the record is its `module.yaml`).
    pub result: Option<Value>,
    /// Log entries dropped to bound memory.
    pub log_dropped: u64,
}

/// One line of the list of builds: what the home page and the build switcher show.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildSummary {
    pub id: u64,
    pub manifest: String,
    pub module: String,
    pub status: Status,
    pub phase: String,
    /// Unix milliseconds.
    pub started_at: u64,
    pub ended_at: Option<u64>,
    pub duration_ms: Option<u64>,
    pub vms: Vec<VmSummary>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSummary {
    pub name: String,
    pub phase: String,
    pub paused: bool,
}

impl BuildState {
    pub fn summary(&self) -> BuildSummary {
        BuildSummary {
            id: self.id,
            manifest: self.manifest.clone(),
            module: self.module.clone(),
            status: self.status,
            phase: self.phase.clone(),
            started_at: self.started_at,
            ended_at: self.duration_ms.map(|d| self.started_at + d),
            duration_ms: self.duration_ms,
            vms: self
                .vms
                .iter()
                .map(|v| VmSummary {
                    name: v.name.clone(),
                    phase: v.phase.clone(),
                    paused: v.paused.is_some(),
                })
                .collect(),
        }
    }

    /// The state before any event: every VM pending, every step listed.
    pub fn new(id: u64, manifest: &str, job: &BuildJob) -> BuildState {
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(crate::events::ms)
            .unwrap_or(0);
        BuildState {
            id,
            manifest: manifest.into(),
            module: job.name.clone(),
            status: Status::Running,
            phase: "Pending".into(),
            phases: vec![],
            vms: job
                .vms
                .iter()
                .map(|vm| VmState {
                    name: vm.name.clone(),
                    phase: "Pending".into(),
                    message: None,
                    phases: vec![],
                    steps: vm
                        .steps
                        .iter()
                        .map(|s| StepState {
                            name: s.name.clone(),
                            kind: s.kind.label().into(),
                            status: "pending",
                            started_ms: None,
                            duration_ms: None,
                            message: None,
                        })
                        .collect(),
                    paused: None,
                    progress: None,
                })
                .collect(),
            started_at,
            duration_ms: None,
            error: None,
            result: None,
            log_dropped: 0,
        }
    }

    fn vm(&mut self, name: &str) -> Option<&mut VmState> {
        self.vms.iter_mut().find(|v| v.name == name)
    }

    /// Applies one event of `kiln build --json`. `job` gives handbuild instructions.
    /// Returns whether the state changed. Unknown or malformed events change nothing.
    pub fn apply(&mut self, ev: &Value, job: &BuildJob, at_ms: u64) -> bool {
        let s = |k: &str| ev.get(k).and_then(Value::as_str);
        let msg = s("message").map(str::to_string);
        let vm_name = s("vm").unwrap_or("").to_string();
        match s("event") {
            Some("build") => {
                let Some(phase) = s("phase") else {
                    return false;
                };
                self.phase = phase.into();
                self.phases.push(PhaseMark {
                    phase: phase.into(),
                    at_ms,
                    message: msg,
                });
                true
            }
            Some("vm") => {
                let Some(phase) = s("phase") else {
                    return false;
                };
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                vm.phase = phase.into();
                vm.message = msg.clone();
                vm.progress = None;
                if matches!(phase, "Failed" | "Succeeded") {
                    vm.paused = None;
                }
                vm.phases.push(PhaseMark {
                    phase: phase.into(),
                    at_ms,
                    message: msg,
                });
                true
            }
            Some("stepStarted") => {
                let Some(i) = ev.get("index").and_then(Value::as_u64) else {
                    return false;
                };
                let i = i as usize;
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                match vm.steps.get_mut(i) {
                    Some(st) => {
                        st.status = "running";
                        st.started_ms = Some(at_ms);
                    }
                    None => return false,
                }
                vm.paused = None;
                true
            }
            // The step cache gave these steps: they do not run.
            Some("stepsCached") => {
                let Some(steps) = ev.get("steps").and_then(Value::as_array) else {
                    return false;
                };
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                for i in steps.iter().filter_map(Value::as_u64) {
                    if let Some(st) = vm.steps.get_mut(i as usize) {
                        st.status = "cached";
                    }
                }
                true
            }
            Some("stepFinished") => {
                let Some(i) = ev.get("index").and_then(Value::as_u64) else {
                    return false;
                };
                let ok = ev.get("ok").and_then(Value::as_bool).unwrap_or(false);
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                match vm.steps.get_mut(i as usize) {
                    Some(st) => {
                        st.status = if ok { "ok" } else { "failed" };
                        st.duration_ms = ev.get("durationMs").and_then(Value::as_u64);
                        st.message = msg;
                    }
                    None => return false,
                }
                vm.paused = None;
                true
            }
            // A handbuild step announces its pause with a note, after it has cleared any old
            // resume flag: only then may Continue write a new one.
            Some("note") => {
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                let Some(index) = vm.steps.iter().position(|st| st.status == "running") else {
                    return false;
                };
                let Some(step) = job
                    .vms
                    .iter()
                    .find(|v| v.name == vm_name)
                    .and_then(|v| v.steps.get(index))
                else {
                    return false;
                };
                match &step.kind {
                    StepKind::Handbuild { instructions } if vm.paused.is_none() => {
                        vm.paused = Some(Pause {
                            index,
                            step: step.name.clone(),
                            instructions: instructions.trim().to_string(),
                        });
                        true
                    }
                    _ => false,
                }
            }
            Some("progress") => {
                let Some(vm) = self.vm(&vm_name) else {
                    return false;
                };
                vm.progress = Some(json!({
                    "what": ev.get("what"),
                    "done": ev.get("done"),
                    "total": ev.get("total"),
                }));
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Step, VmJob};
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

    fn job() -> BuildJob {
        let step = |name: &str, kind| Step {
            name: name.into(),
            timeout: None,
            cache: true,
            kind,
        };
        BuildJob {
            name: "m".into(),
            manifest_path: PathBuf::from("m.yaml"),
            manifest_text: String::new(),
            http_directory: vec![],
            vms: vec![VmJob {
                steps: vec![
                    step(
                        "wait",
                        StepKind::Handbuild {
                            instructions: " install the thing \n".into(),
                        },
                    ),
                    step("s", StepKind::Reboot { command: None }),
                ],
                clean_for_template: true,
                boot_timeout: Duration::from_secs(300),
                ..VmJob::for_test("a", crate::job::SourceSpec::Blank)
            }],
            files: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            retries: 0,
            iso_cache_ttl: Duration::from_secs(86400),
            network: Default::default(),
            base: Default::default(),
        }
    }

    #[test]
    fn steps_the_cache_gave_show_as_cached() {
        let j = job();
        let mut s = BuildState::new(1, "m.yaml", &j);
        assert!(s.apply(
            &json!({"event":"stepsCached","vm":"a","steps":[0, 1, 7],"layers":["k"],"savedMs":5}),
            &j,
            5
        ));
        assert_eq!(s.vms[0].steps[0].status, "cached");
        assert_eq!(s.vms[0].steps[1].status, "cached");
        assert!(!s.apply(&json!({"event":"stepsCached","vm":"a"}), &j, 6));
    }

    #[test]
    fn events_drive_phases_steps_and_the_handbuild_pause() {
        let j = job();
        let mut s = BuildState::new(1, "m.yaml", &j);
        assert_eq!(s.vms[0].steps.len(), 2);
        assert!(s.apply(&json!({"event":"build","phase":"Building"}), &j, 5));
        assert!(s.apply(
            &json!({"event":"vm","vm":"a","phase":"Provisioning"}),
            &j,
            6
        ));
        assert!(s.apply(
            &json!({"event":"stepStarted","vm":"a","index":0,"step":"wait","kind":"handbuild"}),
            &j,
            7
        ));
        assert!(
            s.vms[0].paused.is_none(),
            "paused only once the note says so"
        );
        assert!(s.apply(
            &json!({"event":"note","vm":"a","message":"handbuild..."}),
            &j,
            8
        ));
        let p = s.vms[0].paused.clone().expect("paused");
        assert_eq!((p.index, p.instructions.as_str()), (0, "install the thing"));
        assert!(s.apply(
            &json!({"event":"stepFinished","vm":"a","index":0,"step":"wait","ok":true,"durationMs":9}),
            &j,
            9
        ));
        assert!(s.vms[0].paused.is_none());
        assert_eq!(s.vms[0].steps[0].status, "ok");
        // Notes during a non-handbuild step do not pause.
        s.apply(&json!({"event":"stepStarted","vm":"a","index":1}), &j, 10);
        assert!(!s.apply(&json!({"event":"note","vm":"a","message":"x"}), &j, 11));
        assert!(s.vms[0].paused.is_none());
        assert_eq!(s.vms[0].phases[0].phase, "Provisioning");
        assert_eq!(s.phase, "Building");
    }

    #[test]
    fn malformed_events_change_nothing() {
        let j = job();
        let mut s = BuildState::new(1, "m.yaml", &j);
        for ev in [
            json!({}),
            json!({"event":"vm","vm":"nope","phase":"Booting"}),
            json!({"event":"stepStarted","vm":"a","index":99}),
            json!({"event":"stepFinished","vm":"a","index":"x"}),
            json!({"event":"build"}),
            json!({"event":"note","vm":"a"}),
            json!([1, 2]),
        ] {
            assert!(!s.apply(&ev, &j, 0), "{ev}");
        }
    }
}
