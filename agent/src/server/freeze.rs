//! The `freeze` and `thaw` requests: the guest's writable file systems held still while kiln
//! turns the VM's disk overlay into a layer (a step cache checkpoint).
//!
//! kiln used to run `sync` and `fsfreeze` through `sh -c`: under an emulated CPU each of the
//! dozen process starts costs a good part of a second, while the ioctls themselves take
//! milliseconds. Here the agent makes them itself.
//!
//! A frozen root stops the whole guest, so the agent never leaves one frozen for long: it
//! thaws by itself when no `thaw` comes within [`THAW_LIMIT`], or when the session that froze
//! ends (kiln killed, the connection lost). One freeze at a time: a second one is refused.
//! Nothing here logs or writes to disk while anything is frozen (the log may be a file on the
//! frozen root, and a write there would block until the thaw): what happened is logged after.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cleanup::block_mounts;
use crate::message::{ErrorKind, RemoteError};

/// How long the file systems stay frozen without a `thaw` before the agent thaws them.
pub const THAW_LIMIT: Duration = Duration::from_secs(60);

/// File system types that are frozen: disk file systems whose writes a checkpoint must not
/// split. Others on a block device (fuseblk, iso9660...) cannot be frozen or are read-only.
const FREEZABLE: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "vfat", "msdos", "exfat", "jfs", "reiserfs",
    "nilfs2", "ntfs3",
];

/// How the file systems are reached: the real mount table and ioctls in the agent, fakes in
/// tests (which need neither root nor file systems of their own).
pub trait Freezer: Send + Sync + 'static {
    /// A frozen file system, kept until it is thawed.
    type Fs: Send + 'static;
    /// The mount table, in /proc/self/mountinfo's format.
    fn mountinfo(&self) -> io::Result<String>;
    fn sync(&self);
    fn freeze(&self, point: &Path) -> io::Result<Self::Fs>;
    fn thaw(&self, fs: &Self::Fs) -> io::Result<()>;
}

/// The guest's own mount table, sync(2), FIFREEZE and FITHAW.
pub struct SystemFreezer;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` (linux/fs.h; libc does not name them).
const FIFREEZE: u32 = (3 << 30) | (4 << 16) | (0x58 << 8) | 119;
const FITHAW: u32 = (3 << 30) | (4 << 16) | (0x58 << 8) | 120;

fn ioctl0(f: &File, request: u32) -> io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take an int argument the kernel ignores; `f` is open.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), request as _, &mut unused as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Freezer for SystemFreezer {
    /// The mount point stays open while frozen, so the thaw reaches the same file system
    /// whatever is mounted over it meanwhile.
    type Fs = File;

    fn mountinfo(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }

    fn sync(&self) {
        // SAFETY: sync(2) has no arguments and cannot fail.
        unsafe { libc::sync() };
    }

    fn freeze(&self, point: &Path) -> io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NONBLOCK)
            .open(point)?;
        ioctl0(&f, FIFREEZE)?;
        Ok(f)
    }

    fn thaw(&self, fs: &File) -> io::Result<()> {
        ioctl0(fs, FITHAW)
    }
}

/// The mount points to freeze, deepest first: writable mounts of a block device of a
/// [`FREEZABLE`] type, each device once (a bind mount of one is the same file system).
pub fn targets(mountinfo: &str) -> Vec<String> {
    let mut out: Vec<String> = block_mounts(mountinfo)
        .into_iter()
        .filter(|m| FREEZABLE.contains(&m.fstype.as_str()))
        .map(|m| m.point.to_string_lossy().into_owned())
        .collect();
    // A stable sort: mounts of the same depth keep the table's order.
    out.sort_by_key(|p| std::cmp::Reverse(depth(p)));
    out
}

fn depth(point: &str) -> usize {
    Path::new(point).components().count()
}

/// What is frozen now, and by whom.
struct Frozen<Fs> {
    session: u64,
    /// Tells this freeze's watchdog from a later one's.
    generation: u64,
    since: Instant,
    /// Mount points and their frozen file systems, in the order frozen.
    fs: Vec<(String, Fs)>,
}

struct State<Fs> {
    frozen: Option<Frozen<Fs>>,
    generation: u64,
    /// Why the last freeze ended without a `thaw` (the watchdog, the session's end), for
    /// the `thaw` that comes too late.
    self_thawed: Option<String>,
}

/// The agent's one freeze at a time, shared by every session.
pub struct Freezes<F: Freezer> {
    freezer: F,
    limit: Duration,
    state: Mutex<State<F::Fs>>,
    /// Signalled on every thaw, so the watchdog of a freeze that ended stops waiting.
    thawed: Condvar,
}

/// What a thaw did, logged once nothing is frozen.
struct ThawReport {
    points: Vec<String>,
    frozen_for: Duration,
    failures: Vec<String>,
}

impl<F: Freezer> Freezes<F> {
    pub fn new(freezer: F, limit: Duration) -> Arc<Self> {
        Arc::new(Freezes {
            freezer,
            limit,
            state: Mutex::new(State {
                frozen: None,
                generation: 0,
                self_thawed: None,
            }),
            thawed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<F::Fs>> {
        // A panic elsewhere must not leave the file systems frozen for good.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs, then freezes every target for `session`; the mount points frozen (none when
    /// there is nothing to freeze: then nothing is held). On a failure what was frozen is
    /// thawed again and the error names the mount and why.
    pub fn freeze(self: &Arc<Self>, session: u64) -> Result<Vec<String>, RemoteError> {
        let mut st = self.lock();
        if let Some(f) = &st.frozen {
            return Err(RemoteError::new(
                ErrorKind::Unavailable,
                format!(
                    "the file systems are already frozen (by session {}, {} ms ago)",
                    f.session,
                    f.since.elapsed().as_millis()
                ),
            ));
        }
        let table = self
            .freezer
            .mountinfo()
            .map_err(|e| RemoteError::from_io("reading the mount table", &e))?;
        self.freezer.sync();
        let mut fs: Vec<(String, F::Fs)> = Vec::new();
        for point in targets(&table) {
            match self.freezer.freeze(Path::new(&point)) {
                Ok(f) => fs.push((point, f)),
                // A file system that cannot be frozen (no freeze support) was synced: skipped,
                // like the ones that are not disk file systems.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => {}
                Err(e) => {
                    let report = self.thaw_all(fs, Instant::now());
                    let mut err = RemoteError::from_io(&format!("freezing {point}"), &e);
                    if !report.points.is_empty() {
                        err.message += &format!("; thawed {} again", report.points.join(", "));
                    }
                    for f in &report.failures {
                        err.message += &format!("; {f}");
                    }
                    drop(st);
                    // Logged only when nothing stayed frozen (see the module's comment).
                    if report.failures.is_empty() {
                        tracing::warn!(session, "freeze failed: {}", err.message);
                    }
                    return Err(err);
                }
            }
        }
        if fs.is_empty() {
            return Ok(Vec::new());
        }
        st.generation += 1;
        let generation = st.generation;
        let points = fs.iter().map(|(p, _)| p.clone()).collect();
        st.frozen = Some(Frozen {
            session,
            generation,
            since: Instant::now(),
            fs,
        });
        st.self_thawed = None;
        drop(st);
        let me = Arc::clone(self);
        let watchdog = std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || me.watch(generation));
        if let Err(e) = watchdog {
            // Without a watchdog the freeze is not safe: undone at once.
            self.end(session, "no watchdog could be started");
            return Err(RemoteError::from_io("starting the thaw watchdog", &e));
        }
        Ok(points)
    }

    /// Thaws what `session` froze, in reverse; the mount points thawed.
    pub fn thaw(&self, session: u64) -> Result<Vec<String>, RemoteError> {
        let mut st = self.lock();
        let f = match st.frozen.take() {
            Some(f) if f.session == session => f,
            Some(f) => {
                let other = f.session;
                st.frozen = Some(f);
                return Err(RemoteError::new(
                    ErrorKind::InvalidRequest,
                    format!("the file systems were frozen by session {other}, not this one"),
                ));
            }
            None => {
                let why = match &st.self_thawed {
                    Some(w) => format!("nothing is frozen: {w}"),
                    None => "nothing is frozen".to_string(),
                };
                return Err(RemoteError::new(ErrorKind::InvalidRequest, why));
            }
        };
        let report = self.thaw_all(f.fs, f.since);
        self.thawed.notify_all();
        drop(st);
        tracing::info!(
            session,
            ms = report.frozen_for.as_millis() as u64,
            "froze and thawed {}",
            report.points.join(", ")
        );
        if report.failures.is_empty() {
            Ok(report.points)
        } else {
            Err(RemoteError::new(ErrorKind::Io, report.failures.join("; ")))
        }
    }

    /// A session ended: whatever it froze is thawed.
    pub fn session_ended(&self, session: u64) {
        self.end(session, "the session that froze them ended without a thaw");
    }

    /// Thaws what `session` froze, if anything, and remembers why.
    fn end(&self, session: u64, why: &str) {
        let st = self.lock();
        if st.frozen.as_ref().is_none_or(|f| f.session != session) {
            return;
        }
        self.undo(st, why);
    }

    /// Waits for this freeze's thaw; thaws by itself when none comes within the limit.
    fn watch(&self, generation: u64) {
        let st = self.lock();
        let (st, waited) = self
            .thawed
            .wait_timeout_while(st, self.limit, |s| {
                s.frozen
                    .as_ref()
                    .is_some_and(|f| f.generation == generation)
            })
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            let why = format!(
                "the agent thawed them itself: no thaw came within {:?}",
                self.limit
            );
            self.undo(st, &why);
        }
    }

    /// Thaws the current freeze (the caller checked there is one) and logs it, unlocked.
    fn undo(&self, mut st: MutexGuard<'_, State<F::Fs>>, why: &str) {
        let Some(f) = st.frozen.take() else { return };
        let report = self.thaw_all(f.fs, f.since);
        st.self_thawed = Some(why.to_string());
        self.thawed.notify_all();
        drop(st);
        tracing::warn!(
            session = f.session,
            ms = report.frozen_for.as_millis() as u64,
            "thawed {}: {why}",
            report.points.join(", ")
        );
        for e in &report.failures {
            tracing::error!(session = f.session, "{e}");
        }
    }

    /// Thaws in reverse; every one is tried whatever the others do.
    fn thaw_all(&self, fs: Vec<(String, F::Fs)>, since: Instant) -> ThawReport {
        let mut points = Vec::new();
        let mut failures = Vec::new();
        for (point, f) in fs.into_iter().rev() {
            match self.freezer.thaw(&f) {
                // EINVAL: not frozen any more (someone ran `fsfreeze -u`): thawed all the same.
                Ok(()) => points.push(point),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => points.push(point),
                Err(e) => failures.push(format!("thawing {point}: {e}")),
            }
        }
        ThawReport {
            points,
            frozen_for: since.elapsed(),
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::mpsc;

    const TABLE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid - proc proc rw
25 22 0:22 / /run rw,nosuid - tmpfs tmpfs rw,size=1000k
26 22 254:2 / /boot rw,relatime - ext4 /dev/vda2 rw
27 26 254:3 / /boot/efi rw,relatime - vfat /dev/vda3 rw
28 22 254:4 / /mnt/ro ro,relatime - ext4 /dev/vdb rw
29 22 254:1 /srv /srv rw,relatime - ext4 /dev/vda1 rw
30 22 254:5 / /data\\040x rw - xfs /dev/vdc rw
31 22 0:30 / /merged rw - overlay overlay rw,lowerdir=/a
32 22 0:31 / /net rw - nfs4 srv:/x rw
33 22 254:6 / /media rw - fuseblk /dev/vdd rw
34 22 7:0 / /img ro - iso9660 /dev/loop0 ro
";

    #[test]
    fn targets_are_writable_disk_file_systems_deepest_first_once_each() {
        assert_eq!(targets(TABLE), ["/boot/efi", "/boot", "/data x", "/"]);
        assert!(targets("").is_empty());
        assert!(targets("garbage\n1 2 3\n").is_empty());
    }

    /// Records every call; `fail` names a mount point whose freeze fails with EIO, `nosup`
    /// one that cannot be frozen.
    #[derive(Default)]
    struct Fake {
        table: String,
        fail: Option<&'static str>,
        nosup: Option<&'static str>,
        calls: Mutex<Vec<String>>,
        thawed: Mutex<Option<mpsc::Sender<()>>>,
    }

    impl Freezer for Arc<Fake> {
        type Fs = PathBuf;
        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.table.clone())
        }
        fn sync(&self) {
            self.calls.lock().unwrap().push("sync".into());
        }
        fn freeze(&self, point: &Path) -> io::Result<PathBuf> {
            if self.fail == point.to_str() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if self.nosup == point.to_str() {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("freeze {}", point.display()));
            Ok(point.to_path_buf())
        }
        fn thaw(&self, fs: &PathBuf) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("thaw {}", fs.display()));
            if let Some(tx) = &*self.thawed.lock().unwrap() {
                let _ = tx.send(());
            }
            Ok(())
        }
    }

    fn fake(fail: Option<&'static str>) -> Arc<Fake> {
        Arc::new(Fake {
            table: TABLE.into(),
            fail,
            ..Default::default()
        })
    }

    fn calls(f: &Fake) -> Vec<String> {
        f.calls.lock().unwrap().clone()
    }

    #[test]
    fn freeze_syncs_then_freezes_and_thaw_undoes_it_in_reverse() {
        let f = fake(None);
        let z = Freezes::new(f.clone(), THAW_LIMIT);
        assert_eq!(z.freeze(1).unwrap(), ["/boot/efi", "/boot", "/data x", "/"]);
        // A second freeze, from any session, is refused while frozen.
        let e = z.freeze(1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
        assert!(z.freeze(2).unwrap_err().message.contains("already frozen"));
        // Only the session that froze thaws.
        let e = z.thaw(2).unwrap_err();
        assert!(e.message.contains("session 1"), "{e}");
        assert_eq!(z.thaw(1).unwrap(), ["/", "/data x", "/boot", "/boot/efi"]);
        assert_eq!(
            calls(&f),
            [
                "sync",
                "freeze /boot/efi",
                "freeze /boot",
                "freeze /data x",
                "freeze /",
                "thaw /",
                "thaw /data x",
                "thaw /boot",
                "thaw /boot/efi"
            ]
        );
        assert!(z.thaw(1).unwrap_err().message.contains("nothing is frozen"));
        // And it can be frozen again.
        assert_eq!(z.freeze(2).unwrap().len(), 4);
        z.thaw(2).unwrap();
    }

    #[test]
    fn a_failed_freeze_thaws_what_was_frozen_and_says_which_and_why() {
        let f = fake(Some("/data x"));
        let z = Freezes::new(f.clone(), THAW_LIMIT);
        let e = z.freeze(1).unwrap_err();
        assert_eq!(e.errno, libc::EIO);
        assert!(e.message.starts_with("freezing /data x: "), "{e}");
        assert!(e.message.contains("thawed /boot, /boot/efi again"), "{e}");
        assert_eq!(
            calls(&f)[1..],
            [
                "freeze /boot/efi",
                "freeze /boot",
                "thaw /boot",
                "thaw /boot/efi"
            ]
        );
        // Nothing is held: a later freeze is not refused for it.
        assert!(z.thaw(1).unwrap_err().message.contains("nothing is frozen"));
    }

    #[test]
    fn file_systems_that_cannot_freeze_are_skipped_and_none_holds_nothing() {
        let f = Arc::new(Fake {
            table: TABLE.into(),
            nosup: Some("/boot/efi"),
            ..Default::default()
        });
        let z = Freezes::new(f.clone(), THAW_LIMIT);
        assert_eq!(z.freeze(1).unwrap(), ["/boot", "/data x", "/"]);
        z.thaw(1).unwrap();
        let none = Arc::new(Fake {
            table: "23 22 0:21 / /proc rw,nosuid - proc proc rw\n".into(),
            ..Default::default()
        });
        let z = Freezes::new(none, THAW_LIMIT);
        assert!(z.freeze(1).unwrap().is_empty());
        assert!(z.thaw(1).is_err());
    }

    #[test]
    fn the_end_of_the_freezing_session_thaws() {
        let f = fake(None);
        let z = Freezes::new(f.clone(), THAW_LIMIT);
        z.freeze(7).unwrap();
        // Another session's end changes nothing.
        z.session_ended(8);
        assert!(!calls(&f).iter().any(|c| c.starts_with("thaw")));
        z.session_ended(7);
        assert_eq!(
            calls(&f).iter().filter(|c| c.starts_with("thaw")).count(),
            4
        );
        let e = z.thaw(7).unwrap_err();
        assert!(e.message.contains("session that froze them ended"), "{e}");
        assert_eq!(z.freeze(8).unwrap().len(), 4);
        z.thaw(8).unwrap();
    }

    #[test]
    fn without_a_thaw_the_watchdog_thaws_by_itself() {
        let f = fake(None);
        let (tx, rx) = mpsc::channel();
        *f.thawed.lock().unwrap() = Some(tx);
        let z = Freezes::new(f.clone(), Duration::from_millis(50));
        z.freeze(1).unwrap();
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the watchdog thawed");
        }
        let e = z.thaw(1).unwrap_err();
        assert!(e.message.contains("no thaw came within"), "{e}");
        // A thaw in time stops the watchdog: it does not thaw a later freeze early.
        let z = Freezes::new(f.clone(), Duration::from_secs(3600));
        z.freeze(1).unwrap();
        z.thaw(1).unwrap();
        z.freeze(2).unwrap();
        assert_eq!(z.thaw(2).unwrap().len(), 4);
    }

    /// FIFREEZE on a real ext4 file system: a write from another thread waits for FITHAW.
    /// Needs root, mkfs.ext4 and a loop device; skips loudly without them.
    #[test]
    fn a_real_freeze_holds_writes_until_the_thaw() {
        let Some(mnt) = LoopExt4::new() else { return };
        let f = SystemFreezer;
        let fs = f.freeze(mnt.dir.path()).expect("FIFREEZE");
        let (tx, rx) = mpsc::channel();
        let path = mnt.dir.path().join("written");
        let writer = std::thread::spawn(move || {
            let r = std::fs::write(&path, b"x");
            let _ = tx.send(r.is_ok());
        });
        // A write to a frozen file system waits; it has not returned after a while.
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "a write returned while the file system was frozen"
        );
        f.thaw(&fs).expect("FITHAW");
        assert!(rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the write returned after the thaw"));
        writer.join().unwrap();
        // Thawing again: EINVAL, which thaw_all counts as thawed.
        let e = f.thaw(&fs).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    /// An ext4 image in a temporary folder, mounted on a loop device; unmounted on drop.
    struct LoopExt4 {
        dir: tempfile::TempDir,
        _image: tempfile::TempDir,
    }

    impl LoopExt4 {
        fn new() -> Option<Self> {
            let skip = |why: &str| {
                eprintln!("SKIP a_real_freeze_holds_writes_until_the_thaw: {why}");
                None
            };
            // SAFETY: geteuid has no arguments and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return skip("not root");
            }
            let image = tempfile::tempdir().ok()?;
            let img = image.path().join("fs.img");
            let run = |prog: &str, args: &[&std::ffi::OsStr]| {
                std::process::Command::new(prog)
                    .args(args)
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            };
            if !run(
                "mkfs.ext4",
                &["-q".as_ref(), img.as_os_str(), "16M".as_ref()],
            ) {
                return skip("mkfs.ext4 failed or is missing");
            }
            let dir = tempfile::tempdir().ok()?;
            if !run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    img.as_os_str(),
                    dir.path().as_os_str(),
                ],
            ) {
                return skip("no loop device could be mounted");
            }
            Some(LoopExt4 { dir, _image: image })
        }
    }

    impl Drop for LoopExt4 {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }
}
