//! A checkpoint after a step: the guest's writable file systems are synced and frozen, each
//! of the VM's disks has its overlay moved into a new layer and a fresh overlay opened over
//! it (kiln-disk's [`kiln_disk::LiveDisk`], in this process or the kvm engine's VMM process:
//! [`CheckpointDisk`]; no QEMU involvement), the layer is published to the cache, and the
//! file systems are thawed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::checkpoint_disk::{CheckpointDisk, SwapError};
use super::store::{self, LayerFile, LayerRecord, LayerStore, StoreError};
use crate::guest::{FreezeOutcome, Guest, GuestCommand, FREEZE_TIMEOUT};

/// The mount points of the guest's writable block-device file systems, one a line (shell).
macro_rules! writable_mounts {
    () => {
        r#"awk '$4 ~ /(^|,)rw(,|$)/ && $3 ~ /^(ext[234]|xfs|btrfs|f2fs|vfat)$/ {print $2}' /proc/self/mounts"#
    };
}

/// Freezes every writable file system of a block device, deepest mount first, and prints
/// each; a watchdog thaws them after a minute should kiln never ask (the pid is printed
/// first). Run through `sh -c` (no script file is written on a file system being frozen).
const FREEZE: &str = concat!(
    "sync\n(sleep 60; for m in $(",
    writable_mounts!(),
    "); do fsfreeze -u \"$m\"; done) >/dev/null 2>&1 </dev/null &\necho \"watchdog $!\"\nfor m in $(",
    writable_mounts!(),
    " | sort -r); do\n  fsfreeze -f \"$m\" && echo \"frozen $m\"\ndone"
);

/// Thaws what [`FREEZE`] froze (after the watchdog is killed).
const THAW: &str = concat!(
    "for m in $(",
    writable_mounts!(),
    "); do fsfreeze -u \"$m\" 2>/dev/null; done; true"
);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("disk `{disk}`: {source}")]
    Disk {
        disk: String,
        #[source]
        source: SwapError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("copying the NVRAM {}: {source}", path.display())]
    Nvram {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("thawing the guest's file systems: {0}")]
    Thaw(String),
}

/// How the guest's file systems are frozen for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// The agent's own freeze request; `fsfreeze` through the communicator when it has none
    /// (an older agent, or SSH as root).
    Fsfreeze,
    /// `fsfreeze` under `sudo -n` (SSH as another user).
    Sudo,
    /// Not at all (a guest without a POSIX shell): the layer is what a power cut would leave.
    No,
}

/// Who holds the guest's file systems frozen, so the thaw goes the same way.
enum Held {
    /// The agent (it thaws by itself after a minute or when the session ends).
    Agent,
    /// The `FREEZE` script, with its watchdog's pid when it printed one.
    Script(Option<u32>),
}

/// One VM's checkpoints.
pub struct Checkpointer<'a> {
    pub store: &'a LayerStore,
    pub module: &'a str,
    pub vm: &'a str,
    /// The VM's writable disks, by manifest name.
    pub disks: Vec<(String, Arc<dyn CheckpointDisk>)>,
    pub nvram: Option<PathBuf>,
    pub freeze: Freeze,
}

/// What a checkpoint did and cost.
#[derive(Debug, Clone)]
pub struct Taken {
    pub dir: PathBuf,
    /// False when a whole layer of the same key was already there (this one stays private
    /// to the build).
    pub published: bool,
    /// From the guest's file systems frozen to thawed.
    pub frozen: Duration,
    /// The block layer's part: overlays swapped, the layer hashed, written and published.
    pub disk: Duration,
    pub total: Duration,
    pub bytes: u64,
    /// Set when the file systems could not be frozen (the layer is crash-consistent).
    pub unfrozen: Option<String>,
}

/// What the step a layer follows was.
pub struct StepInfo<'a> {
    /// 1-based.
    pub number: usize,
    pub name: &'a str,
    pub kind: &'a str,
    /// How long the steps since the parent layer ran.
    pub seconds: f64,
}

impl Checkpointer<'_> {
    /// Takes the layer `key` over `parent` now.
    pub fn take(
        &self,
        guest: &mut dyn Guest,
        key: &str,
        parent: Option<&str>,
        step: StepInfo<'_>,
    ) -> Result<Taken, CheckpointError> {
        let start = Instant::now();
        let (held, unfrozen) = match self.freeze_fs(guest) {
            Ok(h) => (Some(h), None),
            Err(why) => (None, Some(why)),
        };
        let frozen_at = Instant::now();
        let made = self.make_layer(key, parent, &step);
        let disk = frozen_at.elapsed();
        let thawed = match held {
            Some(h) => self.thaw(guest, h),
            None => Ok(()),
        };
        let frozen = frozen_at.elapsed();
        let (dir, published, bytes) = made?;
        thawed?;
        Ok(Taken {
            dir,
            published,
            frozen,
            disk,
            total: start.elapsed(),
            bytes,
            unfrozen,
        })
    }

    fn sh(&self, script: &str) -> GuestCommand {
        let mut argv = Vec::new();
        if self.freeze == Freeze::Sudo {
            argv.extend(["sudo".to_string(), "-n".into()]);
        }
        argv.extend(["sh".to_string(), "-c".into(), script.into()]);
        GuestCommand::Argv(argv)
    }

    /// Freezes the guest's file systems: by the agent's request when it has one, else by a
    /// script; what the thaw needs, or why they are not frozen.
    fn freeze_fs(&self, guest: &mut dyn Guest) -> Result<Held, String> {
        if self.freeze == Freeze::No {
            return Err("the guest has no POSIX shell to run fsfreeze".into());
        }
        match guest.freeze().map_err(|e| e.to_string())? {
            FreezeOutcome::Frozen(points) if points.is_empty() => {
                Err("the agent found no writable disk file system to freeze".into())
            }
            FreezeOutcome::Frozen(points) => {
                tracing::debug!(vm = self.vm, "frozen by the agent: {}", points.join(", "));
                Ok(Held::Agent)
            }
            FreezeOutcome::Unsupported(why) => {
                tracing::debug!(vm = self.vm, "freezing with fsfreeze: {why}");
                self.freeze_script(guest).map(Held::Script)
            }
        }
    }

    /// `fsfreeze` through a shell; the watchdog's pid, or why they are not frozen.
    fn freeze_script(&self, guest: &mut dyn Guest) -> Result<Option<u32>, String> {
        let mut out = Vec::new();
        let r = guest
            .exec(
                &self.sh(FREEZE),
                &BTreeMap::new(),
                Some(FREEZE_TIMEOUT),
                &mut |_, b| out.extend_from_slice(b),
            )
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out);
        let watchdog = text
            .lines()
            .find_map(|l| l.strip_prefix("watchdog "))
            .and_then(|p| p.trim().parse().ok());
        let frozen: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("frozen "))
            .collect();
        if !r.success() || frozen.is_empty() {
            return Err(format!(
                "fsfreeze froze {} file systems ({r}): {}",
                frozen.len(),
                text.trim()
            ));
        }
        Ok(watchdog)
    }

    fn thaw(&self, guest: &mut dyn Guest, held: Held) -> Result<(), CheckpointError> {
        let watchdog = match held {
            Held::Agent => {
                return guest
                    .thaw()
                    .map_err(|e| CheckpointError::Thaw(e.to_string()))
            }
            Held::Script(w) => w,
        };
        let kill = watchdog
            .map(|p| format!("kill {p} 2>/dev/null; "))
            .unwrap_or_default();
        let script = format!("{kill}{THAW}");
        let r = guest
            .exec(
                &self.sh(&script),
                &BTreeMap::new(),
                Some(FREEZE_TIMEOUT),
                &mut |_, _| {},
            )
            .map_err(|e| CheckpointError::Thaw(e.to_string()))?;
        if !r.success() {
            return Err(CheckpointError::Thaw(r.to_string()));
        }
        Ok(())
    }

    /// Moves every disk's overlay into a staging folder, publishes it, and opens the fresh
    /// overlays over where the layer ended up.
    fn make_layer(
        &self,
        key: &str,
        parent: Option<&str>,
        step: &StepInfo<'_>,
    ) -> Result<(PathBuf, bool, u64), CheckpointError> {
        let mut staging = self.store.stage(key)?;
        // Declared after `staging`, so on an error each overlay goes back to its VM before
        // the staging folder is removed.
        let mut detached = Vec::new();
        let mut files = Vec::new();
        for (name, disk) in &self.disks {
            let file = store::disk_file(name);
            let derr = |source| CheckpointError::Disk {
                disk: name.clone(),
                source,
            };
            let backing =
                kiln_disk::backing_name(disk.path()).map_err(|e| derr(SwapError::Local(e)))?;
            let d = disk.detach(&staging.dir().join(&file)).map_err(derr)?;
            files.push(store::layer_file(&staging, name, &file, backing)?);
            detached.push((name, file, d));
        }
        let nvram = match &self.nvram {
            Some(p) => {
                let dst = staging.dir().join(store::NVRAM_FILE);
                fs::copy(p, &dst).map_err(|source| CheckpointError::Nvram {
                    path: p.clone(),
                    source,
                })?;
                Some(store::layer_file(
                    &staging,
                    "nvram",
                    store::NVRAM_FILE,
                    None,
                )?)
            }
            None => None,
        };
        let bytes = files.iter().chain(&nvram).map(|f: &LayerFile| f.size).sum();
        let record = LayerRecord {
            format: store::FORMAT,
            key: key.into(),
            parent: parent.map(str::to_string),
            module: self.module.into(),
            vm: self.vm.into(),
            step: step.number,
            step_name: step.name.into(),
            step_kind: step.kind.into(),
            seconds: step.seconds,
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            disks: files,
            nvram,
        };
        let (dir, published) = self.store.publish(&mut staging, &record)?;
        for (name, file, d) in detached {
            d.attach(&dir.join(&file))
                .map_err(|source| CheckpointError::Disk {
                    disk: name.clone(),
                    source,
                })?;
        }
        Ok((dir, published, bytes))
    }
}

/// The layer folder's disk file for `disk`, for a VM resumed from `dir`.
pub fn layer_disk(dir: &Path, disk: &str) -> PathBuf {
    dir.join(store::disk_file(disk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{ExecOutcome, GuestError};
    use std::time::Duration;

    /// A guest that takes no request: checkpoints with [`Freeze::No`] never ask it anything.
    pub(super) struct Absent;

    impl Guest for Absent {
        fn exec(
            &mut self,
            _: &GuestCommand,
            _: &BTreeMap<String, String>,
            _: Option<Duration>,
            _: &mut dyn FnMut(crate::events::Stream, &[u8]),
        ) -> Result<ExecOutcome, GuestError> {
            Err(GuestError::NotAvailable("no guest".into()))
        }
        fn put_file(&mut self, _: &str, _: &[u8], _: u32) -> Result<(), GuestError> {
            Err(GuestError::NotAvailable("no guest".into()))
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            Err(GuestError::NotAvailable("no guest".into()))
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            Err(GuestError::NotAvailable("no guest".into()))
        }
    }

    pub(super) fn key(round: u32, i: u32) -> String {
        crate::cache::sha256_bytes(format!("{round}/{i}").as_bytes())
    }

    /// Checkpoints a disk in a loop, writing between them, until killed: the child of
    /// [`a_kill_during_checkpoints_leaves_no_half_layer`] (`KILN_CRASH_DIR`, `KILN_CRASH_ROUND`).
    #[test]
    #[ignore = "the child process of a_kill_during_checkpoints_leaves_no_half_layer"]
    fn checkpoint_loop_child() {
        let (Some(dir), Some(round)) = (
            std::env::var_os("KILN_CRASH_DIR"),
            std::env::var("KILN_CRASH_ROUND").ok(),
        ) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let round: u32 = round.parse().unwrap();
        let store = LayerStore::at(&dir.join("cache")).unwrap();
        let top = dir.join(format!("vm-{round}.qcow2"));
        kiln_disk::create(
            &top,
            &kiln_disk::CreateOptions {
                size: Some(64 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = kiln_disk::LiveDisk::open(&top, kiln_disk::OpenOptions::read_write()).unwrap();
        let cp = Checkpointer {
            store: &store,
            module: "m",
            vm: "v",
            disks: vec![("root".into(), disk.clone() as Arc<dyn CheckpointDisk>)],
            nvram: None,
            freeze: Freeze::No,
        };
        let chunk: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
        for i in 0..1000u32 {
            kiln_disk::BlockDevice::write_at(&*disk, &chunk, u64::from(i % 30) * (2 << 20))
                .unwrap();
            let parent = (i > 0).then(|| key(round, i - 1));
            cp.take(
                &mut Absent,
                &key(round, i),
                parent.as_deref(),
                StepInfo {
                    number: i as usize + 1,
                    name: "s",
                    kind: "shell",
                    seconds: 0.0,
                },
            )
            .unwrap();
        }
    }

    #[test]
    fn a_kill_during_checkpoints_leaves_no_half_layer() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut whole = 0;
        // Kills land at different points of the checkpoint loop.
        for (round, ms) in [40u64, 90, 150, 230, 310, 420].into_iter().enumerate() {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "step_cache::checkpoint::tests::checkpoint_loop_child",
                    "--nocapture",
                ])
                .env("KILN_CRASH_DIR", dir.path())
                .env("KILN_CRASH_ROUND", round.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let store = LayerStore::at(&dir.path().join("cache")).unwrap();
            for e in std::fs::read_dir(dir.path().join("cache/layers")).unwrap() {
                let k = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    store.verified(&k).is_some(),
                    "round {round}: layer {k} is under its key but not whole"
                );
                whole += 1;
            }
        }
        assert!(
            whole > 0,
            "no checkpoint finished before the kills: the test saw nothing"
        );
    }

    use crate::events::Stream;

    /// A guest that records what the checkpoint asked of it; `agent` is what its freeze
    /// request answers (None: it has none, like an older agent or SSH).
    struct Recorder {
        agent: Option<Vec<String>>,
        log: Vec<String>,
    }

    impl Guest for Recorder {
        fn exec(
            &mut self,
            cmd: &GuestCommand,
            _env: &BTreeMap<String, String>,
            _timeout: Option<Duration>,
            out: &mut dyn FnMut(Stream, &[u8]),
        ) -> Result<ExecOutcome, GuestError> {
            let GuestCommand::Argv(argv) = cmd else {
                panic!("{cmd:?}")
            };
            let script = argv.last().cloned().unwrap_or_default();
            if script == FREEZE {
                self.log.push("script freeze".into());
                out(Stream::Stdout, b"watchdog 42\nfrozen /\n");
            } else {
                self.log.push(format!(
                    "script thaw{}",
                    if script.starts_with("kill 42 ") {
                        " (watchdog killed)"
                    } else {
                        ""
                    }
                ));
            }
            Ok(ExecOutcome {
                code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 1,
            })
        }
        fn put_file(&mut self, _: &str, _: &[u8], _: u32) -> Result<(), GuestError> {
            unreachable!()
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            unreachable!()
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            unreachable!()
        }
        fn freeze(&mut self) -> Result<FreezeOutcome, GuestError> {
            match &self.agent {
                Some(points) => {
                    self.log.push("agent freeze".into());
                    Ok(FreezeOutcome::Frozen(points.clone()))
                }
                None => Ok(FreezeOutcome::Unsupported("older agent".into())),
            }
        }
        fn thaw(&mut self) -> Result<(), GuestError> {
            self.log.push("agent thaw".into());
            Ok(())
        }
    }

    fn take(agent: Option<Vec<String>>) -> (Vec<String>, Taken) {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerStore::at(tmp.path()).unwrap();
        let cp = Checkpointer {
            store: &store,
            module: "m",
            vm: "box",
            disks: Vec::new(),
            nvram: None,
            freeze: Freeze::Fsfreeze,
        };
        let mut g = Recorder {
            agent,
            log: Vec::new(),
        };
        let step = StepInfo {
            number: 1,
            name: "one",
            kind: "shell",
            seconds: 1.0,
        };
        let taken = cp.take(&mut g, "k1", None, step).unwrap();
        (g.log, taken)
    }

    #[test]
    fn the_agents_freeze_request_is_used_when_it_has_one() {
        let (log, taken) = take(Some(vec!["/".into()]));
        assert_eq!(log, ["agent freeze", "agent thaw"]);
        assert!(taken.unfrozen.is_none());
    }

    #[test]
    fn without_the_request_the_script_freezes_and_its_watchdog_goes_with_the_thaw() {
        let (log, taken) = take(None);
        assert_eq!(log, ["script freeze", "script thaw (watchdog killed)"]);
        assert!(taken.unfrozen.is_none());
    }

    #[test]
    fn nothing_to_freeze_is_a_layer_without_freezing_and_no_thaw() {
        let (log, taken) = take(Some(Vec::new()));
        assert_eq!(log, ["agent freeze"]);
        assert!(taken
            .unfrozen
            .unwrap()
            .contains("no writable disk file system"));
    }
}

#[cfg(test)]
mod disk_kinds {
    //! The same checkpoints through both kinds of [`CheckpointDisk`]: a `LiveDisk` in this
    //! process, and a disk behind a VMM's checkpoint socket (served here by the VMM's own
    //! request handling on a thread, as its process does).

    use super::tests::{key, Absent};
    use super::*;
    use crate::step_cache::VmmDisk;
    use kiln_disk::{BlockDevice, LiveDisk};
    use kiln_vmm::process::checkpoint::{self, CheckpointMessage, Checkpoints, LiveDisks};
    use kiln_vmm::process::Response;

    fn fresh(dir: &Path, name: &str) -> (PathBuf, Arc<LiveDisk>) {
        let top = dir.join(name);
        kiln_disk::create(
            &top,
            &kiln_disk::CreateOptions {
                size: Some(4 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = LiveDisk::open(&top, kiln_disk::OpenOptions::read_write()).unwrap();
        (top, disk)
    }

    /// Serves `disk` as disk 0 of a VMM on `socket`, layers under `root`.
    fn serve_vmm(disk: Arc<LiveDisk>, socket: &Path, root: PathBuf) {
        let (tx, rx) = std::sync::mpsc::channel();
        checkpoint::listen(socket, tx, |m| m).unwrap();
        std::thread::spawn(move || {
            let live = LiveDisks::new(vec![Some(disk)], &root).unwrap();
            let mut c = Checkpoints::new(&live);
            for m in rx {
                match m {
                    CheckpointMessage::Request {
                        session,
                        req,
                        reply,
                    } => {
                        let _ = reply.send(match c.handle(session, req) {
                            Ok(()) => Response::Ok,
                            Err(error) => Response::CheckpointFailed { error },
                        });
                    }
                    CheckpointMessage::Closed(s) => c.close(s),
                }
            }
        });
    }

    fn read(path: &Path, at: u64) -> u8 {
        let d = kiln_disk::open(path, kiln_disk::OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, at).unwrap();
        b[0]
    }

    /// Two layers through `cp_disk` (writes go to `disk`, the same disk however served).
    fn two_layers(dir: &Path, top: &Path, disk: &LiveDisk, cp_disk: Arc<dyn CheckpointDisk>) {
        let store = LayerStore::at(&dir.join("cache")).unwrap();
        // A guard dropped unattached puts the overlay back.
        let staged = dir.join("cache/tmp/dropped.qcow2");
        let d = cp_disk.detach(&staged).unwrap();
        assert!(!top.exists());
        drop(d);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !top.exists() || staged.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the overlay is not back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let cp = Checkpointer {
            store: &store,
            module: "m",
            vm: "v",
            disks: vec![("root".into(), cp_disk)],
            nvram: None,
            freeze: Freeze::No,
        };
        let step = |n| StepInfo {
            number: n,
            name: "s",
            kind: "shell",
            seconds: 0.0,
        };
        disk.write_at(&[1u8; 512], 0).unwrap();
        let one = cp.take(&mut Absent, &key(0, 1), None, step(1)).unwrap();
        disk.write_at(&[2u8; 512], 0).unwrap();
        disk.write_at(&[3u8; 512], 512).unwrap();
        let k1 = key(0, 1);
        let two = cp
            .take(&mut Absent, &key(0, 2), Some(&k1), step(2))
            .unwrap();
        disk.flush().unwrap();
        assert!(store.verified(&key(0, 1)).is_some() && store.verified(&key(0, 2)).is_some());
        let l1 = layer_disk(&one.dir, "root");
        let l2 = layer_disk(&two.dir, "root");
        assert_eq!((read(&l1, 0), read(&l1, 512)), (1, 0));
        assert_eq!((read(&l2, 0), read(&l2, 512)), (2, 3));
        assert_eq!(
            kiln_disk::backing_name(top).unwrap().as_deref(),
            Some(fs::canonicalize(&l2).unwrap().to_str().unwrap())
        );
    }

    #[test]
    fn a_disk_in_this_process_and_one_behind_a_vmm_socket_checkpoint_alike() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        fs::create_dir_all(&local).unwrap();
        let (top, disk) = fresh(&local, "vm.qcow2");
        two_layers(&local, &top, &disk, disk.clone());

        let remote = dir.path().join("remote");
        fs::create_dir_all(remote.join("cache/tmp")).unwrap();
        let (top, disk) = fresh(&remote, "vm.qcow2");
        let socket = remote.join("checkpoint.sock");
        serve_vmm(disk.clone(), &socket, remote.join("cache"));
        let vmm = Arc::new(VmmDisk {
            socket,
            index: 0,
            path: top.clone(),
        });
        two_layers(&remote, &top, &disk, vmm.clone());
        // A layer outside the VMM's layer folder is refused, typed.
        let refused = matches!(
            vmm.detach(&remote.join("outside.qcow2")),
            Err(SwapError::Vmm(
                kiln_vmm::process::checkpoint::ClientError::Refused(
                    kiln_vmm::process::checkpoint::CheckpointError::OutsideRoot { .. },
                )
            ))
        );
        assert!(refused, "a layer outside the cache must be refused");
    }
}
