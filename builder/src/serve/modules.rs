//! Modules and clones in `kiln serve`: what `kiln ls` lists, a module's record, and what
//! `kiln clone`, `kiln run` and `kiln rm --clone` do, for the page. Names in URLs are module
//! and clone names (DNS labels), never paths: nothing outside the two folders is reached.
//!
//! - `GET /api/modules` -> `{dir, clonesDir, modules: [summary]}`
//! - `GET /api/modules/NAME` -> the record: `module.yaml` as text and parsed, disks, inputs,
//!   the manifest it was built from, its clones
//! - `POST /api/modules/NAME/clones` -> a new clone (`kiln clone NAME`, count 1)
//! - `GET /api/clones` -> `{dir, clones: [clone]}`; `GET /api/clones/NAME` -> `clone`
//! - `POST /api/clones/NAME/start` (`kiln run NAME` in a child), `POST /api/clones/NAME/stop`
//!   (its Ctrl-C, waited for) -> `clone`
//! - `DELETE /api/clones/NAME` -> `{deleted}` (`kiln rm --clone`; refused while it runs)

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

use super::clone_runs::{CloneRuns, RunConfig, RunError};
use crate::clone::{self, CloneError, CloneRecord};
use crate::module::{self, ModuleError, ModuleRecord};

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("no module `{name}` in {}", dir.display())]
    NoModule { name: String, dir: PathBuf },
    #[error("no clone `{name}` in {}", dir.display())]
    NoClone { name: String, dir: PathBuf },
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Clone(#[from] CloneError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Lock(#[from] crate::run_lock::RunLockError),
}

impl ModulesError {
    pub fn status(&self) -> u16 {
        match self {
            ModulesError::NoModule { .. } | ModulesError::NoClone { .. } => 404,
            ModulesError::Module(ModuleError::Name(_)) => 400,
            ModulesError::Module(ModuleError::NotFound { .. }) => 404,
            ModulesError::Run(e) => e.status(),
            ModulesError::Lock(crate::run_lock::RunLockError::Running { .. }) => 409,
            _ => 500,
        }
    }
}

/// A request this module answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Modules,
    Module(String),
    MakeClone(String),
    Clones,
    Clone(String),
    Start(String),
    Stop(String),
    Delete(String),
}

impl Route {
    /// The route of `method path`, or `None` when it is not one of this module's (so another
    /// route may take it).
    pub fn parse(method: &str, path: &str) -> Option<Route> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let name = |s: &str| s.to_string();
        Some(match (method, parts.as_slice()) {
            ("GET", ["api", "modules"]) => Route::Modules,
            ("GET", ["api", "modules", m]) => Route::Module(name(m)),
            ("POST", ["api", "modules", m, "clones"]) => Route::MakeClone(name(m)),
            ("GET", ["api", "clones"]) => Route::Clones,
            ("GET", ["api", "clones", c]) => Route::Clone(name(c)),
            ("DELETE", ["api", "clones", c]) => Route::Delete(name(c)),
            ("POST", ["api", "clones", c, "start"]) => Route::Start(name(c)),
            ("POST", ["api", "clones", c, "stop"]) => Route::Stop(name(c)),
            _ => return None,
        })
    }
}

pub struct ModulesConfig {
    /// The modules folder (serve's `--output`).
    pub modules: PathBuf,
    /// The clones folder.
    pub clones: PathBuf,
    pub program: PathBuf,
    pub run_root: PathBuf,
}

pub struct Modules {
    modules: PathBuf,
    clones: PathBuf,
    runs: CloneRuns,
    /// Held while a clone is made: two at once would pick the same `<module>-<n>`.
    making: Mutex<()>,
}

impl Modules {
    pub fn new(cfg: ModulesConfig) -> Modules {
        Modules {
            runs: CloneRuns::new(RunConfig {
                program: cfg.program,
                clones: cfg.clones.clone(),
                run_root: cfg.run_root,
            }),
            modules: cfg.modules,
            clones: cfg.clones,
            making: Mutex::new(()),
        }
    }

    /// Answers `route`; `building` names the modules a running build is writing.
    pub fn handle(&self, route: Route, building: &[String]) -> Result<Value, ModulesError> {
        match route {
            Route::Modules => self.list(building),
            Route::Module(m) => self.module(&m, building),
            Route::MakeClone(m) => self.make_clone(&m),
            Route::Clones => {
                let clones = clone::list(&self.clones)?;
                Ok(json!({
                    "dir": self.clones.display().to_string(),
                    "clones": clones.iter().map(|(p, c)| self.clone_json(p, c)).collect::<Vec<_>>(),
                }))
            }
            Route::Clone(c) => {
                let (dir, rec) = self.find_clone(&c)?;
                Ok(self.clone_json(&dir, &rec))
            }
            Route::Start(c) => {
                let (dir, rec) = self.find_clone(&c)?;
                self.runs.start(&c, &vm_names(&rec))?;
                Ok(self.clone_json(&dir, &rec))
            }
            Route::Stop(c) => {
                let (dir, rec) = self.find_clone(&c)?;
                self.runs.stop(&c, &vm_names(&rec))?;
                Ok(self.clone_json(&dir, &rec))
            }
            Route::Delete(c) => {
                let (dir, rec) = self.find_clone(&c)?;
                if self.runs.is_running(&c, &vm_names(&rec)) {
                    return Err(RunError::Running(c).into());
                }
                // As `kiln rm --clone`: under the run lock, so no run starts meanwhile.
                let _lock = crate::run_lock::acquire(&dir, &c)?;
                module::remove_folder(&dir)?;
                self.runs.forget(&c);
                Ok(json!({ "deleted": c }))
            }
        }
    }

    /// Stops the clones this server started (it is ending).
    pub fn stop_all(&self) {
        self.runs.stop_all();
    }

    fn list(&self, building: &[String]) -> Result<Value, ModulesError> {
        let clones = clone::list(&self.clones)?;
        let mods = module::list(&self.modules)?;
        let out: Vec<Value> = mods
            .iter()
            .map(|(dir, r)| {
                let disks = || r.vms.iter().flat_map(|v| &v.disks);
                json!({
                    "name": r.name,
                    "dir": dir.display().to_string(),
                    "engine": r.engine,
                    "builtAt": r.built_at,
                    "vms": r.vms.iter().map(|v| &v.name).collect::<Vec<_>>(),
                    "size": disks().map(|d| d.file_size).sum::<u64>(),
                    "virtualSize": disks().map(|d| d.virtual_size).sum::<u64>(),
                    "digest": disks().next().map(|d| d.sha256.as_str()),
                    "firmware": firmware(r),
                    "status": status(r, building),
                    "clones": users(&clones, dir).len(),
                })
            })
            .collect();
        Ok(json!({
            "dir": self.modules.display().to_string(),
            "clonesDir": self.clones.display().to_string(),
            "modules": out,
        }))
    }

    fn find_module(&self, name: &str) -> Result<(PathBuf, ModuleRecord), ModulesError> {
        // A name, never a path (`module::find` would take a path).
        module::check_name(name)?;
        let dir = self.modules.join(name);
        if !dir.join(module::MODULE_FILE).is_file() {
            return Err(ModulesError::NoModule {
                name: name.into(),
                dir: self.modules.clone(),
            });
        }
        let rec = module::load(&dir)?;
        Ok((dir, rec))
    }

    fn module(&self, name: &str, building: &[String]) -> Result<Value, ModulesError> {
        let (dir, r) = self.find_module(name)?;
        let text = std::fs::read_to_string(dir.join(module::MODULE_FILE))
            .map_err(crate::path_io::PathIoError::at("reading", &dir))
            .map_err(ModuleError::from)?;
        let clones = clone::list(&self.clones)?;
        let mine: Vec<Value> = users(&clones, &dir)
            .into_iter()
            .map(|(p, c)| self.clone_json(p, c))
            .collect();
        let disks: Vec<Value> = r
            .vms
            .iter()
            .flat_map(|v| {
                v.disks.iter().map(move |d| {
                    json!({
                        "vm": v.name, "name": d.name, "file": d.file, "sha256": d.sha256,
                        "virtualSize": d.virtual_size, "fileSize": d.file_size,
                        "backingModule": d.backing_module,
                    })
                })
            })
            .collect();
        let vms: Vec<Value> = r
            .vms
            .iter()
            .map(|v| {
                json!({
                    "name": v.name, "cpus": v.cpus, "memoryMib": v.memory_mib,
                    "boot": crate::cli::modules::boot_label(v),
                    "agentInImage": v.agent_in_image,
                    // What the build resolved its source to, and the ISOs it attached.
                    "source": v.source, "isos": v.isos,
                })
            })
            .collect();
        Ok(json!({
            "name": r.name,
            "dir": dir.display().to_string(),
            "text": text,
            "record": serde_json::to_value(&r).unwrap_or(Value::Null),
            "status": status(&r, building),
            "firmware": firmware(&r),
            "vms": vms,
            "disks": disks,
            "manifest": r.manifest,
            "clones": mine,
        }))
    }

    fn make_clone(&self, name: &str) -> Result<Value, ModulesError> {
        let (dir, rec) = self.find_module(name)?;
        // A thin module is only as good as the parent disk under it.
        module::verify_layers(&dir, &rec)?;
        let _one = self.making.lock().unwrap_or_else(|p| p.into_inner());
        let made = clone::create(&dir, &rec, &self.clones, &rec.name, 1)?;
        let path = made
            .into_iter()
            .next()
            .ok_or_else(|| ModulesError::NoClone {
                name: rec.name.clone(),
                dir: self.clones.clone(),
            })?;
        let c = clone::load(&path)?;
        Ok(self.clone_json(&path, &c))
    }

    fn find_clone(&self, name: &str) -> Result<(PathBuf, CloneRecord), ModulesError> {
        module::check_name(name)?;
        let dir = self.clones.join(name);
        if !dir.join(clone::CLONE_FILE).is_file() {
            return Err(ModulesError::NoClone {
                name: name.into(),
                dir: self.clones.clone(),
            });
        }
        let rec = clone::load(&dir)?;
        Ok((dir, rec))
    }

    fn clone_json(&self, dir: &Path, c: &CloneRecord) -> Value {
        let run = self.runs.state(&c.name, &vm_names(c));
        json!({
            "name": c.name,
            "module": c.module,
            "dir": dir.display().to_string(),
            "vms": vm_names(c),
            "state": run.state,
            "runningVms": run.running_vms,
            "ours": run.ours,
            "exit": run.exit,
            "log": run.log,
        })
    }
}

fn vm_names(c: &CloneRecord) -> Vec<String> {
    c.vms.iter().map(|v| v.name.clone()).collect()
}

/// The clones (of `clones`) made from the module folder `dir`, as `kiln rm` counts them.
fn users<'a>(clones: &'a [(PathBuf, CloneRecord)], dir: &Path) -> Vec<&'a (PathBuf, CloneRecord)> {
    let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    clones
        .iter()
        .filter(|(_, c)| {
            std::fs::canonicalize(&c.module_path).unwrap_or_else(|_| c.module_path.clone()) == want
        })
        .collect()
}

/// How the module's VMs boot, as `kiln ls` says it (one value when they agree).
fn firmware(r: &ModuleRecord) -> String {
    let mut labels: Vec<String> = r.vms.iter().map(crate::cli::modules::boot_label).collect();
    labels.dedup();
    labels.join(", ")
}

fn status(r: &ModuleRecord, building: &[String]) -> &'static str {
    if building.contains(&r.name) {
        "rebuilding"
    } else {
        "ready"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::tests::build_with;

    #[test]
    fn routes_are_only_names_in_known_shapes() {
        assert_eq!(Route::parse("GET", "/api/modules"), Some(Route::Modules));
        assert_eq!(
            Route::parse("POST", "/api/modules/web/clones"),
            Some(Route::MakeClone("web".into()))
        );
        assert_eq!(
            Route::parse("DELETE", "/api/clones/web-1"),
            Some(Route::Delete("web-1".into()))
        );
        assert_eq!(
            Route::parse("POST", "/api/clones/web-1/stop"),
            Some(Route::Stop("web-1".into()))
        );
        // Not ours: other methods, deeper paths (the terminal's), other prefixes.
        assert_eq!(Route::parse("GET", "/api/clones/web-1/start"), None);
        assert_eq!(Route::parse("PUT", "/api/modules/web"), None);
        assert_eq!(Route::parse("GET", "/api/clones/c/vms/v/terminal"), None);
        assert_eq!(Route::parse("GET", "/api/modulesx"), None);
    }

    fn modules(d: &Path) -> Modules {
        Modules::new(ModulesConfig {
            modules: d.join("modules"),
            clones: d.join("clones"),
            program: PathBuf::from("/bin/false"),
            run_root: d.join("run"),
        })
    }

    #[test]
    fn names_that_are_paths_are_refused_with_400() {
        let d = tempfile::tempdir().unwrap();
        let m = modules(d.path());
        for bad in ["..", "a%2Fb", "UPPER", "-x", ""] {
            for route in [
                Route::Module(bad.into()),
                Route::MakeClone(bad.into()),
                Route::Start(bad.into()),
                Route::Delete(bad.into()),
            ] {
                let e = m.handle(route, &[]).unwrap_err();
                assert_eq!(e.status(), 400, "{bad}: {e}");
            }
        }
        let e = m.handle(Route::Module("nope".into()), &[]).unwrap_err();
        assert_eq!(e.status(), 404);
        assert!(e.to_string().contains("no module `nope`"), "{e}");
        let e = m.handle(Route::Stop("nope".into()), &[]).unwrap_err();
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn a_module_is_listed_cloned_and_its_clone_deleted() {
        let d = tempfile::tempdir().unwrap();
        build_with(&d.path().join("modules"), "m", b"v1", None, None);
        let m = modules(d.path());
        let list = m.handle(Route::Modules, &["m".into()]).unwrap();
        let first = &list["modules"][0];
        assert_eq!(first["name"], "m");
        assert_eq!(first["status"], "rebuilding");
        assert_eq!(first["clones"], 0);
        let made = m.handle(Route::MakeClone("m".into()), &[]).unwrap();
        assert_eq!(made["name"], "m-1");
        assert_eq!(made["state"], "stopped");
        let rec = m.handle(Route::Module("m".into()), &[]).unwrap();
        assert_eq!(rec["clones"][0]["name"], "m-1");
        assert!(rec["text"].as_str().unwrap().contains("name: m"));
        assert_eq!(rec["disks"][0]["vm"], "web");
        let e = m.handle(Route::Stop("m-1".into()), &[]).unwrap_err();
        assert_eq!(e.status(), 409, "{e}");
        let gone = m.handle(Route::Delete("m-1".into()), &[]).unwrap();
        assert_eq!(gone["deleted"], "m-1");
        assert!(!d.path().join("clones/m-1").exists());
        let e = m.handle(Route::Clone("m-1".into()), &[]).unwrap_err();
        assert_eq!(e.status(), 404);
    }
}
