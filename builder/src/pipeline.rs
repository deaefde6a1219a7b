//! `kiln build` from a [`BuildJob`] to a committed module: sources, overlays, boot, steps,
//! capture, module, with the build's timeout, retries, `--on-error` and cancellation.
//!
//! Every VM runs on its own thread. Running VMs are kept in a shared [`VmRegistry`] so that a
//! timeout, Ctrl-C or another VM's failure can stop all of them at once; a VM thread blocked
//! on its guest then sees the connection drop and ends.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::cache::Cache;
use crate::capture;
use crate::diskops;
use crate::engine::{self, DiskAttach, Engine, EngineChoice, RunningVm, VmLaunch};
use crate::events::{ms, BuildPhase, Event, EventSink, VmPhase};
use crate::guest::{Connector, Guest, GuestCommand, GuestError, VsockConnector};
use crate::job::{BuildJob, FileContent, VmJob};
use crate::module::{BootRecord, DiskRecord, ModuleRecord, PendingModule, VmRecord};
use crate::network::{self as modnet, Internet};
use crate::provision::Provisioner;
use crate::sources::{self, bootstrap::AGENT_VSOCK_PORT, ResolvedSource};

/// What to do with a failed build's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Stop every VM and remove the partial module.
    Abort,
    /// Leave the failed VMs running for inspection until Ctrl-C.
    Keep,
}

/// Options of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The folder modules are written to (and `buildRef` parents read from).
    pub output: PathBuf,
    pub engine: EngineChoice,
    pub on_error: OnError,
    /// Capture `buildRef` children as a layer over the parent's disk.
    pub thin: bool,
    pub cache: Cache,
    /// `Internet::Off` (`--no-internet`): no VPC gets NAT to the host, whatever the manifest
    /// says (hermetic builds, tests).
    pub internet: Internet,
    /// Where a failed or cancelled build's step output and serial logs are moved (see
    /// [`crate::build_logs`]); `None` drops them with the partial module.
    pub failed_logs: Option<PathBuf>,
    /// Replace a module of the same name (`--force`); without it such a build is refused.
    pub replace: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("VM `{vm}`: {message}")]
    Vm { vm: String, message: String },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("the build passed its timeout of {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Module(#[from] crate::module::ModuleError),
    #[error(transparent)]
    RuntimeDir(#[from] crate::runtime::RuntimeDirError),
}

/// A running VM shared between its build thread and whoever must stop it.
pub type SharedVm = Arc<Mutex<Box<dyn RunningVm>>>;

/// The VMs running now, so a cancel can stop all of them.
#[derive(Default, Clone)]
pub struct VmRegistry(Arc<Mutex<BTreeMap<String, SharedVm>>>);

impl VmRegistry {
    fn add(&self, name: &str, vm: SharedVm) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), vm);
    }
    fn remove(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
    /// Stops every VM at once.
    pub fn kill_all(&self) {
        let vms: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for vm in vms {
            vm.lock().unwrap_or_else(|p| p.into_inner()).kill();
        }
    }
    pub fn pids(&self) -> Vec<u32> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).pids())
            .collect()
    }
}

/// Shared state of one build.
pub struct BuildContext {
    pub events: Arc<dyn EventSink>,
    pub cancel: Arc<AtomicBool>,
    pub registry: VmRegistry,
}

/// The runtime folder for sockets, per user and checked (see [`crate::runtime`]).
pub fn runtime_root() -> Result<PathBuf, crate::runtime::RuntimeDirError> {
    crate::runtime::root()
}

/// Runs a build, with its retries. Returns the committed module's folder.
pub fn run(job: &BuildJob, opts: &BuildOptions, ctx: &BuildContext) -> Result<PathBuf, BuildError> {
    let mut attempt = 0;
    loop {
        match run_once(job, opts, ctx) {
            Ok(p) => return Ok(p),
            Err(e @ BuildError::Cancelled) => return Err(e),
            Err(e) if attempt < job.retries && !ctx.cancel.load(Ordering::SeqCst) => {
                attempt += 1;
                ctx.events.emit(&Event::Note {
                    vm: None,
                    message: format!("build failed ({e}); retry {attempt} of {}", job.retries),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

fn run_once(
    job: &BuildJob,
    opts: &BuildOptions,
    ctx: &BuildContext,
) -> Result<PathBuf, BuildError> {
    let start = Instant::now();
    let ev = ctx.events.as_ref();
    let build_phase = |phase, message: Option<String>| {
        ev.emit(&Event::Build {
            phase,
            elapsed_ms: ms(start.elapsed()),
            message,
        })
    };
    build_phase(BuildPhase::Pending, Some(format!("module `{}`", job.name)));
    let probe = kiln_vmm::doctor::probe();
    let pick = engine::pick(opts.engine, &probe);
    ev.emit(&Event::Note {
        vm: None,
        message: format!(
            "engine: {} ({})",
            match pick.engine {
                EngineChoice::Kvm => "kvm",
                _ => "qemu",
            },
            pick.why
        ),
    });
    let engine: Arc<dyn Engine> =
        Arc::from(engine::make(pick.engine).map_err(|e| BuildError::Setup(e.to_string()))?);

    let pending = PendingModule::begin(&opts.output, &job.name, opts.replace)?;
    // Declared after `pending`, so it runs first when a failed attempt returns.
    let mut keep_logs = KeepLogsOnFailure {
        from: pending.dir().join("logs"),
        to: opts.failed_logs.clone(),
    };
    let run_dir = runtime_root()?.join(std::process::id().to_string());
    fs::create_dir_all(&run_dir)
        .map_err(|e| BuildError::Setup(format!("creating {}: {e}", run_dir.display())))?;
    let _run_guard = RemoveOnDrop(run_dir.clone());
    // Proves to other kiln processes' start-up clean-up that this folder is in use.
    let _run_lock = crate::leftovers::OwnerLock::hold(&run_dir)
        .map_err(|e| BuildError::Setup(format!("locking {}: {e}", run_dir.display())))?;

    // Every `files[]` URL is fetched now, before anything boots, so a dead URL fails the build
    // at once with its reason instead of after a long boot.
    let fetched = prefetch_files(job, &opts.cache, ev)
        .inspect_err(|e| build_phase(BuildPhase::Failed, Some(e.to_string())))?;
    let job = &fetched;

    build_phase(BuildPhase::Networking, None);
    // One isolated network per build, with `buildOverrides` applied; its thread stops when
    // `net` drops at the end of this attempt.
    let net = modnet::start(&job.network, opts.internet).map_err(|e| {
        let e = BuildError::Setup(e.to_string());
        build_phase(BuildPhase::Failed, Some(e.to_string()));
        e
    })?;
    for s in &job.network.subnets {
        let internet = job
            .network
            .vpcs
            .iter()
            .any(|v| v.name == s.vpc && v.internet)
            && opts.internet == Internet::AsDeclared;
        ev.emit(&Event::Note {
            vm: None,
            message: format!(
                "network: subnet {} {} in VPC {}, gateway {}{}, internet {}",
                s.name,
                s.cidr,
                s.vpc,
                net.gateway(&s.name)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                if s.dhcp && !s.unmanaged {
                    " (DHCP, DNS)"
                } else {
                    ""
                },
                if internet { "on" } else { "off" }
            ),
        });
    }
    pending.write_base(&job.base)?;
    if !job.http_directory.is_empty() {
        let dir = run_dir.join("http");
        let cache = opts.cache.clone();
        crate::http_directory::serve(
            &net,
            &job.http_directory,
            &job.files,
            &dir,
            &move |url: &str| fetch_file_url(&cache, url),
        )
        .map_err(|e| {
            let e = BuildError::Setup(e.to_string());
            build_phase(BuildPhase::Failed, Some(e.to_string()));
            e
        })?;
        ev.emit(&Event::Note {
            vm: None,
            message: format!(
                "httpDirectory: {} served at http://<gateway>:{}/<name> (steps get KILN_HTTP_ADDR and PACKER_HTTP_ADDR)",
                job.http_directory.join(", "),
                crate::http_directory::PORT
            ),
        });
    }
    build_phase(BuildPhase::Building, None);

    // Watchdog: the build's timeout stops everything.
    let timed_out = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (cancel, registry, timed_out, done) = (
            ctx.cancel.clone(),
            ctx.registry.clone(),
            timed_out.clone(),
            done.clone(),
        );
        let limit = job.timeout;
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > limit {
                    timed_out.store(true, Ordering::SeqCst);
                    cancel.store(true, Ordering::SeqCst);
                }
                if cancel.load(Ordering::SeqCst) {
                    registry.kill_all();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let failed = Arc::new(AtomicBool::new(false));
    let capturing_once = AtomicBool::new(false);
    let barrier = StepsBarrier::new(job.vms.len());
    let results: Vec<Result<VmRecord, BuildError>> = std::thread::scope(|s| {
        let handles: Vec<_> = job
            .vms
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let engine = engine.clone();
                let failed = failed.clone();
                let net = &net;
                let barrier = &barrier;
                let failed_flag = failed.clone();
                let pending = &pending;
                let run_dir = &run_dir;
                let capturing_once = &capturing_once;
                let build_phase = &build_phase;
                s.spawn(move || {
                    let r = build_vm(
                        job,
                        vm,
                        i,
                        opts,
                        ctx,
                        engine.as_ref(),
                        net,
                        pending,
                        run_dir,
                        &|| {
                            barrier.arrive_and_wait(&|| {
                                failed_flag.load(Ordering::SeqCst)
                                    || ctx.cancel.load(Ordering::SeqCst)
                            })
                        },
                        &|| {
                            if !capturing_once.swap(true, Ordering::SeqCst) {
                                build_phase(BuildPhase::CapturingDisks, None);
                            }
                        },
                    );
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                        if opts.on_error == OnError::Abort {
                            // One failed VM fails the build: stop the others now.
                            ctx.cancel.store(true, Ordering::SeqCst);
                        }
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BuildError::Setup("a VM thread panicked".into())))
            })
            .collect()
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();

    let mut vms = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(v) => vms.push(v),
            // The VM that failed first names the failure; the others were stopped for it.
            Err(e) => {
                let better = matches!(first_err, None | Some(BuildError::Cancelled));
                if better {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        build_phase(BuildPhase::Failed, Some(e.to_string()));
        if timed_out.load(Ordering::SeqCst) {
            return Err(BuildError::Timeout(job.timeout));
        }
        return Err(e);
    }
    let record = ModuleRecord {
        api_version: "kiln/v1".into(),
        kind: "Module".into(),
        name: job.name.clone(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        engine: engine.name().into(),
        built_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: start.elapsed().as_secs_f64(),
        vms,
        manifest: job.manifest_text.clone(),
    };
    // The last moment an interrupt stops the build; after the rename the module is whole.
    if ctx.cancel.load(Ordering::SeqCst) {
        build_phase(BuildPhase::Failed, Some("cancelled".into()));
        return Err(BuildError::Cancelled);
    }
    keep_logs.to = None;
    let dir = pending.commit(&record)?;
    build_phase(
        BuildPhase::Succeeded,
        Some(format!("module at {}", dir.display())),
    );
    Ok(dir)
}

/// VMs shut down for capture only once every VM of the module has finished its steps: the
/// module's VMs are built together, so one may serve the others during their steps (a web
/// server for a client that fetches from it) and none is captured half-way through such an
/// exchange.
struct StepsBarrier {
    done: Mutex<usize>,
    cv: Condvar,
    total: usize,
}

impl StepsBarrier {
    fn new(total: usize) -> Self {
        StepsBarrier {
            done: Mutex::new(0),
            cv: Condvar::new(),
            total,
        }
    }

    /// Marks one VM done and waits for the others; `false` when `stop()` says the build is
    /// failing or cancelled instead.
    fn arrive_and_wait(&self, stop: &dyn Fn() -> bool) -> bool {
        let mut n = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.cv.notify_all();
        while *n < self.total {
            if stop() {
                return false;
            }
            n = self
                .cv
                .wait_timeout(n, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Moves a failed attempt's logs out of the partial module before it is removed.
struct KeepLogsOnFailure {
    from: PathBuf,
    to: Option<PathBuf>,
}

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if let Some(to) = &self.to {
            if let Err(e) = crate::build_logs::keep(&self.from, to) {
                tracing::warn!(
                    "keeping the logs of the failed build in {}: {e}",
                    to.display()
                );
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether a NIC of `vm` gets its address from the build network's DHCP.
fn uses_dhcp(job: &BuildJob, vm: &VmJob) -> bool {
    vm.nics.iter().any(|n| dhcp_subnet(job, &n.subnet))
}

/// Whether the build network serves DHCP on `subnet`.
fn dhcp_subnet(job: &BuildJob, subnet: &str) -> bool {
    job.network
        .subnets
        .iter()
        .any(|s| s.name == subnet && s.dhcp && !s.unmanaged)
}

/// How long a guest may take to configure its network after its agent answers.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(120);

/// An agent often answers before the guest's DHCP client has configured its NIC; steps that
/// use the network (another VM by name, `httpDirectory`, a package mirror) would race it.
/// This waits until the guest has an IPv4 route other than loopback's (`/proc/net/route`,
/// read with shell builtins only, so any Linux image can run it). A guest that never gets
/// one is warned about, not failed: a step may set the network up itself.
const NETWORK_READY: &str = r#"# Sleep without starting a program each time (a fork and exec costs tens of milliseconds of
# guest CPU under TCG, taken from the boot this waits for): read with a timeout from a FIFO
# nobody writes to.
f=/run/kiln-network-wait.$$
if mkfifo -m 600 "$f" 2>/dev/null; then exec 3<>"$f"; rm -f "$f"; fi
nap() { if [ -e /proc/self/fd/3 ]; then read -r -t 0.2 -u 3 _; else sleep 0.2; fi; }
i=0
while [ $i -lt 600 ]; do
  while read -r iface dest rest; do
    [ "$iface" != Iface ] && [ "$iface" != lo ] && exit 0
  done < /proc/net/route
  nap
  i=$((i+1))
done
exit 1
"#;

/// The leases of `vm`'s DHCP NICs, bound now on the build network, as the agent's
/// `NetConfig` request: the addresses the guest's own DHCP client will get.
fn bound_leases(
    job: &BuildJob,
    vm: &VmJob,
    net: &kiln_net::Network,
) -> Vec<kiln_agent::LinkConfig> {
    vm.nics
        .iter()
        .filter(|n| dhcp_subnet(job, &n.subnet))
        .filter_map(|n| {
            let mac = n.mac_bytes().ok()?;
            let lease = net.lease(mac).ok()??;
            Some(kiln_agent::LinkConfig {
                mac,
                address: lease.address,
                prefix: lease.prefix,
                gateway: Some(lease.gateway),
                dns: lease.dns,
                search: Vec::new(),
                lease_secs: lease.lease_time.as_secs().min(u64::from(u32::MAX)) as u32,
            })
        })
        .collect()
}

/// Gets the guest's network ready for the steps: hands it the bound leases and static
/// addresses through its agent (on a session of its own: an agent too old for the request
/// closes it), or, when the agent declines or cannot, waits for the guest's own DHCP client
/// (static addresses alone: warns, as nothing else will configure them). Nothing to do
/// without DHCP NICs or static addresses.
fn network_up(
    connector: &dyn Connector,
    guest: &mut dyn Guest,
    links: &[kiln_agent::LinkConfig],
    vm: &str,
    ev: &dyn EventSink,
) {
    if links.is_empty() {
        return;
    }
    // An agent that knows the request takes it on the main session; for an older one (it
    // may close the session on a request it does not know) a session of its own.
    let handed = if guest.takes_net_config() {
        guest.net_config(links)
    } else {
        connector
            .connect(NETWORK_HANDOVER_CONNECT)
            .and_then(|mut g| g.net_config(links))
    };
    match handed {
        Ok(()) => {
            let addrs: Vec<String> = links
                .iter()
                .map(|l| format!("{}/{}", l.address, l.prefix))
                .collect();
            let how = if links.iter().all(kiln_agent::LinkConfig::is_static) {
                "static"
            } else {
                "its DHCP client takes the same lease over"
            };
            ev.emit(&Event::Note {
                vm: Some(vm.to_string()),
                message: format!("network: {} handed to the guest ({how})", addrs.join(", ")),
            });
        }
        Err(e) if links.iter().all(kiln_agent::LinkConfig::is_static) => {
            let addrs: Vec<String> = links.iter().map(|l| l.address.to_string()).collect();
            ev.emit(&Event::Note {
                vm: Some(vm.to_string()),
                message: format!(
                    "warning: the static address {} could not be configured in the guest ({e}); running the steps anyway",
                    addrs.join(", ")
                ),
            });
        }
        Err(e) => {
            tracing::info!(
                vm,
                "the guest configures its own network ({e}); waiting for it"
            );
            wait_for_network(guest, vm, ev);
        }
    }
}

/// How long opening the session for the network handover may take (the agent already
/// answered on another session).
const NETWORK_HANDOVER_CONNECT: Duration = Duration::from_secs(10);

fn wait_for_network(guest: &mut dyn Guest, vm: &str, ev: &dyn EventSink) {
    let r = guest.exec(
        &GuestCommand::Bash(NETWORK_READY.into()),
        &BTreeMap::new(),
        Some(NETWORK_TIMEOUT),
        &mut |_, _| {},
    );
    let problem = match r {
        Ok(st) if st.success() => return,
        Ok(st) => format!("no IPv4 route after {NETWORK_TIMEOUT:?} ({st})"),
        Err(e) => format!("checking the network: {e}"),
    };
    ev.emit(&Event::Note {
        vm: Some(vm.to_string()),
        message: format!(
            "warning: the guest's network is not configured ({problem}); running the steps anyway"
        ),
    });
}

/// The job with every `files` URL (named files and file steps' own) fetched into the cache:
/// each URL once, with download progress events; the first that fails names itself and why.
fn prefetch_files(
    job: &BuildJob,
    cache: &Cache,
    ev: &dyn EventSink,
) -> Result<BuildJob, BuildError> {
    let mut fetched: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = job.clone();
    // Named files first, so a failure names the `files[]` entry rather than a step's copy.
    let mut entries: Vec<(&String, &mut FileContent)> = out.files.iter_mut().collect();
    entries.sort_by_key(|(name, _)| name.starts_with('\0'));
    for (name, content) in entries {
        let FileContent::Url(url) = content else {
            continue;
        };
        let path = match fetched.get(url.as_str()) {
            Some(p) => p.clone(),
            None => {
                ev.emit(&Event::Note {
                    vm: None,
                    message: format!("fetching {url}"),
                });
                let f = sources::url::fetch(cache, url, None, None, ev).map_err(|e| {
                    // File steps' entries have private names; the URL names them well enough.
                    let what = if name.starts_with('\0') {
                        "a file step's URL".to_string()
                    } else {
                        format!("file `{name}`")
                    };
                    BuildError::Setup(format!("{what}: {e} (nothing was booted)"))
                })?;
                fetched.insert(url.clone(), f.path.clone());
                f.path
            }
        };
        *content = FileContent::Cached {
            url: url.clone(),
            path,
        };
    }
    Ok(out)
}

/// The bytes of a `files` entry given by URL, through the download cache.
fn fetch_file_url(cache: &Cache, url: &str) -> Result<Vec<u8>, String> {
    let f = sources::url::fetch(
        cache,
        url,
        None,
        None,
        &crate::events::MemorySink::default(),
    )
    .map_err(|e| e.to_string())?;
    fs::read(&f.path).map_err(|e| e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn build_vm(
    job: &BuildJob,
    vm: &VmJob,
    index: usize,
    opts: &BuildOptions,
    ctx: &BuildContext,
    engine: &dyn Engine,
    net: &kiln_net::Network,
    pending: &PendingModule,
    run_dir: &Path,
    steps_done: &dyn Fn() -> bool,
    capturing: &dyn Fn(),
) -> Result<VmRecord, BuildError> {
    let start = Instant::now();
    let ev = ctx.events.as_ref();
    let phase = |p: VmPhase, msg: Option<String>| {
        ev.emit(&Event::Vm {
            vm: vm.name.clone(),
            phase: p,
            elapsed_ms: ms(start.elapsed()),
            message: msg,
        })
    };
    let fail = |message: String| {
        phase(VmPhase::Failed, Some(message.clone()));
        BuildError::Vm {
            vm: vm.name.clone(),
            message,
        }
    };
    let cancelled = || ctx.cancel.load(Ordering::SeqCst);
    phase(VmPhase::Pending, None);

    // Source.
    phase(VmPhase::SourceImporting, None);
    let manifest_dir = job
        .manifest_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let src: ResolvedSource = sources::resolve(
        &opts.cache,
        &vm.source,
        &vm.name,
        &manifest_dir,
        &opts.output,
        ev,
    )
    .map_err(|e| fail(e.to_string()))?;
    if cancelled() {
        return Err(BuildError::Cancelled);
    }
    let boot = src.boot.clone().ok_or_else(|| {
        fail("this source has no kernel to boot (blank disks need an ISO install, which kiln does not do yet)".into())
    })?;
    // Images without kiln's agent get it through a cloud-init NoCloud seed, attached
    // read-only after the VM's disks and never captured.
    let work = pending.dir().join("work");
    let seed =
        sources::seed::prepare(vm, src.agent_in_image, &work).map_err(|e| fail(e.to_string()))?;

    // Overlays.
    let mut attaches = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let path = work.join(format!("{}-{}.qcow2", vm.name, d.name));
        let base = if i == 0 { src.base.as_ref() } else { None };
        if let Some(b) = base {
            if d.size_bytes < b.virtual_size {
                return Err(fail(format!(
                    "disk `{}` is {} bytes, smaller than its source ({} bytes)",
                    d.name, d.size_bytes, b.virtual_size
                )));
            }
        }
        diskops::create_overlay(
            base.map(|b| (b.path.as_path(), b.format)),
            &path,
            d.size_bytes,
        )
        .map_err(|e| fail(e.to_string()))?;
        attaches.push(DiskAttach {
            name: d.name.clone(),
            path,
            read_only: false,
        });
    }

    // Boot.
    phase(VmPhase::Booting, Some(engine.name().into()));
    let vm_run = run_dir.join(&vm.name);
    let serial_log = pending
        .dir()
        .join("logs")
        .join(format!("{}-serial.log", vm.name));
    // Made here, 0600, so the engine appends to a file only its owner can read.
    crate::log_file::create(&serial_log)
        .map_err(|e| fail(format!("creating {}: {e}", serial_log.display())))?;
    let nics = modnet::attach(net, &vm.name, &vm.nics).map_err(|e| fail(e.to_string()))?;
    let launch = VmLaunch {
        name: vm.name.clone(),
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        boot: boot.clone(),
        cmdline_extra: vec![],
        disks: attaches
            .iter()
            .cloned()
            .chain(seed.iter().map(|path| DiskAttach {
                name: sources::seed::LABEL.into(),
                path: path.clone(),
                read_only: true,
            }))
            .collect(),
        workdir: vm_run.clone(),
        serial_log: serial_log.clone(),
        cid: 3 + index as u32,
        nics,
    };
    let running = engine.launch(&launch).map_err(|e| fail(e.to_string()))?;
    let socket = running.vsock_socket().to_path_buf();
    let running = Arc::new(Mutex::new(running));
    ctx.registry.add(&vm.name, running.clone());
    let _unregister = Unregister(&ctx.registry, &vm.name);

    let log_path = pending.dir().join("logs").join(format!("{}.log", vm.name));
    let log = crate::log_file::create(&log_path)
        .map(Mutex::new)
        .map_err(|e| fail(format!("creating {}: {e}", log_path.display())))?;

    let result = (|| -> Result<Vec<DiskRecord>, String> {
        let connector = VsockConnector::new(&socket, AGENT_VSOCK_PORT);
        // Short tries, so a cancel (Ctrl-C, the build timeout, another VM's failure) ends the
        // wait at once instead of after the whole boot timeout.
        // A VM that ends while booting (a crash, a kernel that cannot run, a reset loop) ends
        // the wait too, with the console's last lines.
        let stop_wait = AtomicBool::new(false);
        let vm_gone = AtomicBool::new(false);
        let wait_over = AtomicBool::new(false);
        let waited = std::thread::scope(|s| {
            s.spawn(|| {
                while !wait_over.load(Ordering::SeqCst) {
                    if ctx.cancel.load(Ordering::SeqCst) {
                        stop_wait.store(true, Ordering::SeqCst);
                        return;
                    }
                    if !running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_running()
                    {
                        vm_gone.store(true, Ordering::SeqCst);
                        stop_wait.store(true, Ordering::SeqCst);
                        return;
                    }
                    // Short: the scope below joins this thread before the steps start.
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let r = connector.connect_until(vm.boot_timeout, &stop_wait, &mut |_| Ok(()));
            wait_over.store(true, Ordering::SeqCst);
            r
        });
        let mut guest = waited.map_err(|e| {
            if vm_gone.load(Ordering::SeqCst) {
                format!(
                    "the VM stopped before its agent answered{}",
                    serial_tail(&serial_log)
                )
            } else {
                format!("{}{}", GuestError::from(e), serial_tail(&serial_log))
            }
        })?;
        let mut leases = if uses_dhcp(job, vm) {
            bound_leases(job, vm, net)
        } else {
            Vec::new()
        };
        // Static addresses on subnets without DHCP: the agent is all that configures them.
        leases.extend(modnet::static_links(&job.network, net, &vm.nics));
        let network_ready = |g: &mut dyn Guest| network_up(&connector, g, &leases, &vm.name, ev);
        network_ready(&mut *guest);
        phase(VmPhase::Provisioning, None);
        let cache = opts.cache.clone();
        let fetch = move |url: &str| fetch_file_url(&cache, url);
        // `httpDirectory`: shell steps are told where the files are (their first NIC's gateway).
        let steps = match vm.nics.first().and_then(|n| net.gateway(&n.subnet)) {
            Some(gw) if !job.http_directory.is_empty() => {
                crate::http_directory::with_env(&vm.steps, &crate::http_directory::step_env(gw))
            }
            _ => vm.steps.clone(),
        };
        let prov = Provisioner {
            vm: &vm.name,
            steps: &steps,
            files: &job.files,
            connector: &connector,
            events: ev,
            log: Some(&log),
            cancel: ctx.cancel.clone(),
            resume_flag: vm_run.join("resume"),
            fetch_url: &fetch,
            network_ready: &network_ready,
        };
        let guest = prov.run(guest).map_err(|e| e.to_string())?;
        if cancelled() {
            return Err("cancelled".into());
        }
        if job.vms.len() > 1 {
            ev.emit(&Event::Note {
                vm: Some(vm.name.clone()),
                message: "steps done; waiting for the other VMs before shutting down".into(),
            });
        }
        if !steps_done() {
            return Err(if cancelled() {
                "cancelled".into()
            } else {
                "stopped before capture: another VM of the module failed".into()
            });
        }
        phase(VmPhase::ShuttingDown, None);
        capture::shutdown(
            guest,
            &connector,
            &running,
            vm.clean_for_template,
            Duration::from_secs(180),
        )
        .map_err(|e| e.to_string())?;
        capturing();
        let mut disks = Vec::new();
        for (i, a) in attaches.iter().enumerate() {
            // --thin: a buildRef child's boot disk becomes a layer over its parent's disk.
            let thin_over = src.parent_disk.as_ref().filter(|_| opts.thin && i == 0);
            let rec = capture::capture_to_module(
                pending.dir(),
                pending.final_dir(),
                &vm.name,
                &a.name,
                &a.path,
                thin_over,
            )
            .map_err(|e| e.to_string())?;
            let _ = fs::remove_file(&a.path);
            disks.push(rec);
            // A Ctrl-C during a capture ends the build once that disk is written: no module
            // is committed after an interrupt.
            if cancelled() {
                return Err("cancelled".into());
            }
        }
        Ok(disks)
    })();

    let disks = match result {
        Ok(d) => d,
        Err(message) => {
            let message = if cancelled() && !message.contains("failed") {
                return Err(BuildError::Cancelled);
            } else {
                message
            };
            if opts.on_error == OnError::Keep {
                ev.emit(&Event::Note {
                    vm: Some(vm.name.clone()),
                    message: format!(
                        "--on-error keep: the VM stays up (serial log {}); Ctrl-C ends the build",
                        serial_log.display()
                    ),
                });
                while !cancelled() {
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            running.lock().unwrap_or_else(|p| p.into_inner()).kill();
            return Err(fail(message));
        }
    };
    phase(VmPhase::DiskCaptured, None);

    // Kernel and initrd travel with the module: clones boot them directly.
    let boot_dir = pending.dir().join("boot").join(&vm.name);
    fs::create_dir_all(&boot_dir).map_err(|e| fail(e.to_string()))?;
    let kernel_rel = format!("boot/{}/vmlinuz", vm.name);
    fs::copy(&boot.kernel, pending.dir().join(&kernel_rel)).map_err(|e| fail(e.to_string()))?;
    let initrd_rel = match &boot.initrd {
        Some(i) => {
            let rel = format!("boot/{}/initrd.img", vm.name);
            fs::copy(i, pending.dir().join(&rel)).map_err(|e| fail(e.to_string()))?;
            Some(rel)
        }
        None => None,
    };
    {
        let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "captured in {:.1}s", start.elapsed().as_secs_f64());
    }
    phase(VmPhase::Succeeded, None);
    Ok(VmRecord {
        name: vm.name.clone(),
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        source: src.record.clone(),
        // The seed installed the agent into the captured disk.
        agent_in_image: src.agent_in_image || seed.is_some(),
        boot: Some(BootRecord {
            kernel: kernel_rel,
            initrd: initrd_rel,
            root: boot.root.clone(),
        }),
        disks,
    })
}

struct Unregister<'a>(&'a VmRegistry, &'a str);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

fn serial_tail(path: &Path) -> String {
    let t = fs::read(path).unwrap_or_default();
    let t = String::from_utf8_lossy(&t);
    let lines: Vec<&str> = t.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\nlast serial console lines:\n  {}",
        lines[lines.len().saturating_sub(10)..].join("\n  ")
    )
}

/// Files of the job, for tests that build jobs by hand.
pub fn inline_files(pairs: &[(&str, &str)]) -> BTreeMap<String, FileContent> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), FileContent::Inline(v.to_string())))
        .collect()
}

#[cfg(test)]
mod barrier_tests {
    use super::*;

    #[test]
    fn steps_barrier_waits_for_every_vm_and_a_stop_releases_it() {
        let b = StepsBarrier::new(2);
        let never = || false;
        std::thread::scope(|s| {
            let first = s.spawn(|| {
                let t = Instant::now();
                (b.arrive_and_wait(&never), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(b.arrive_and_wait(&never));
            let (ok, waited) = first.join().unwrap();
            assert!(ok);
            assert!(waited >= Duration::from_millis(250), "{waited:?}");
        });
        // One VM of two arrives, then the build fails: the wait ends with `false`.
        let b = StepsBarrier::new(2);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.arrive_and_wait(&|| stop.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::SeqCst);
            assert!(!waiter.join().unwrap());
        });
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;
    use crate::events::MemorySink;
    use crate::provision::tests::{FakeGuest, FakeState};
    use std::sync::{Arc, Mutex};

    /// Sessions whose `net_config` takes the handover (`Ok`) or refuses it.
    struct Handover {
        state: Arc<Mutex<FakeState>>,
        takes: bool,
    }

    /// A session that accepts the handover or not (`.1`) and that knows the request (`.2`:
    /// an agent of protocol 2, which takes it on the main session).
    struct HandoverGuest(FakeGuest, bool, bool);

    impl Guest for HandoverGuest {
        fn exec(
            &mut self,
            cmd: &GuestCommand,
            env: &BTreeMap<String, String>,
            timeout: Option<Duration>,
            out: &mut dyn FnMut(crate::events::Stream, &[u8]),
        ) -> Result<crate::guest::ExecOutcome, GuestError> {
            self.0.exec(cmd, env, timeout, out)
        }
        fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError> {
            self.0.put_file(path, data, mode)
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            self.0.reboot()
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            self.0.poweroff()
        }
        fn net_config(&mut self, _links: &[kiln_agent::LinkConfig]) -> Result<(), GuestError> {
            if self.1 {
                Ok(())
            } else {
                Err(GuestError::Lost("an old agent closed the session".into()))
            }
        }
        fn takes_net_config(&self) -> bool {
            self.2
        }
    }

    impl Connector for Handover {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            Ok(Box::new(HandoverGuest(
                FakeGuest(self.state.clone()),
                self.takes,
                false,
            )))
        }
    }

    fn link() -> kiln_agent::LinkConfig {
        kiln_agent::LinkConfig {
            mac: [2, 0, 0, 0, 0, 1],
            address: [10, 0, 2, 2].into(),
            prefix: 24,
            gateway: Some([10, 0, 2, 1].into()),
            dns: vec![[10, 0, 2, 1].into()],
            search: vec![],
            lease_secs: 3600,
        }
    }

    /// A connector that must not be used.
    struct NoSessions;

    impl Connector for NoSessions {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            panic!("the handover opened a session although the main one takes it")
        }
    }

    #[test]
    fn an_agent_that_knows_the_request_takes_it_on_the_main_session() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let ev = MemorySink::default();
        let mut main = HandoverGuest(FakeGuest(state.clone()), true, true);
        network_up(&NoSessions, &mut main, &[link()], "vm", &ev);
        assert_eq!(state.lock().unwrap().commands.len(), 0);
        // It declines (the guest's own stack got there first): the wait, on the same session.
        let mut main = HandoverGuest(FakeGuest(state.clone()), false, true);
        network_up(&NoSessions, &mut main, &[link()], "vm", &ev);
        assert_eq!(state.lock().unwrap().commands.len(), 1);
    }

    /// Runs `network_up`; returns the commands the main session ran and the notes.
    fn up(takes: bool, links: &[kiln_agent::LinkConfig]) -> (usize, Vec<String>) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let conn = Handover {
            state: state.clone(),
            takes,
        };
        let ev = MemorySink::default();
        let mut main = FakeGuest(state.clone());
        network_up(&conn, &mut main, links, "vm", &ev);
        let notes = ev
            .events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Note { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect();
        let n = state.lock().unwrap().commands.len();
        (n, notes)
    }

    #[test]
    fn the_lease_is_handed_over_or_the_guest_dhcp_is_waited_for() {
        // Taken: no wait runs in the guest, and the build says what was handed over.
        let (cmds, notes) = up(true, &[link()]);
        assert_eq!(cmds, 0);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("10.0.2.2/24 handed to the guest")),
            "{notes:?}"
        );
        // Refused (an old agent, or one that declines): the route wait runs instead.
        let (cmds, notes) = up(false, &[link()]);
        assert_eq!(cmds, 1, "the wait for the guest's own DHCP");
        assert!(notes.iter().all(|n| !n.contains("handed")), "{notes:?}");
        // No DHCP NIC: nothing at all.
        assert_eq!(up(false, &[]), (0, vec![]));
    }

    #[test]
    fn a_static_address_is_handed_over_or_warned_about_without_a_wait() {
        let mut s = link();
        s.lease_secs = kiln_agent::STATIC_LEASE;
        let (cmds, notes) = up(true, std::slice::from_ref(&s));
        assert_eq!(cmds, 0);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("10.0.2.2/24 handed to the guest (static)")),
            "{notes:?}"
        );
        // No DHCP client will configure it: no wait, a warning that names the address.
        let (cmds, notes) = up(false, &[s]);
        assert_eq!(cmds, 0, "no wait for a DHCP client");
        assert!(
            notes.iter().any(|n| n.contains("warning")
                && n.contains("static address 10.0.2.2 could not be configured")),
            "{notes:?}"
        );
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    /// A loopback server answering every GET with `body`; counts the requests.
    fn serve(body: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
        (port, hits)
    }

    fn job(files: BTreeMap<String, FileContent>) -> BuildJob {
        BuildJob {
            name: "m".into(),
            manifest_path: PathBuf::from("m.yaml"),
            manifest_text: String::new(),
            vms: vec![],
            files,
            http_directory: vec![],
            timeout: Duration::from_secs(60),
            retries: 0,
            network: Default::default(),
            base: Default::default(),
        }
    }

    #[test]
    fn each_url_is_fetched_once_into_the_cache_and_a_dead_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        let (port, hits) = serve(b"\x00tool bytes\xff");
        let url = format!("http://127.0.0.1:{port}/tool.tar");
        let mut files = inline_files(&[("motd", "hi\n")]);
        files.insert("tool.tar".into(), FileContent::Url(url.clone()));
        // A file step's own copy of the same URL.
        files.insert("\0step:a:0".into(), FileContent::Url(url.clone()));
        let ev = crate::events::MemorySink::default();
        let out = prefetch_files(&job(files), &cache, &ev).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1, "one download per URL");
        for key in ["tool.tar", "\0step:a:0"] {
            match &out.files[key] {
                FileContent::Cached { url: u, path } => {
                    assert_eq!(u, &url);
                    assert!(path.starts_with(cache.root()));
                    assert_eq!(fs::read(path).unwrap(), b"\x00tool bytes\xff");
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(matches!(&out.files["motd"], FileContent::Inline(s) if s == "hi\n"));

        // A dead URL: the named entry is reported, with the URL and why.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = format!("http://127.0.0.1:{port}/gone.tar");
        let mut files = BTreeMap::new();
        files.insert("\0step:a:0".into(), FileContent::Url(dead.clone()));
        files.insert("gone.tar".into(), FileContent::Url(dead.clone()));
        let e = prefetch_files(&job(files), &cache, &ev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file `gone.tar`") && e.contains(&dead), "{e}");
        assert!(e.contains("nothing was booted"), "{e}");
    }
}
