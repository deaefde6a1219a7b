//! The `cleanup` request: a template cleanup plan carried out inside the agent.
//!
//! kiln used to run its template cleanup as a bash script. Under an emulated CPU (QEMU TCG)
//! every program start costs 0.2-1 s, and the script started a dozen of them (truncate, rm,
//! mkdir, ln, sync, fstrim...): about 6 s of a capture went to process starts. The same
//! effects done here with system calls take milliseconds. kiln decides what to clean (the
//! plan is its policy); this module only knows how to truncate, remove, write, link, sync
//! and trim.
//!
//! Every step is best effort: a failure is reported in words (the action, the path and the
//! OS error) and the next step runs, like the script under `set +e`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::message::{CleanupAction, CleanupPlan, CleanupReport, MAX_CLEANUP_FAILURES};

/// Longest failure line kept (a report must fit in one frame).
const MAX_FAILURE_LINE: usize = 1024;

/// Trims one mounted file system (given by its mount point); returns the bytes trimmed.
pub type Trimmer = Box<dyn FnMut(&Path) -> io::Result<u64> + Send>;

/// Where `TrimAll` looks and how it trims: the real mount table and FITRIM in the agent,
/// a fake table and a recording trimmer in tests (which must never trim the host).
pub struct Context {
    /// The mount table, in /proc/self/mountinfo's format.
    pub mountinfo: PathBuf,
    pub trim: Trimmer,
}

impl Context {
    /// The guest's own mount table and the FITRIM ioctl.
    pub fn system() -> Context {
        Context {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            trim: Box::new(fitrim),
        }
    }
}

/// Runs every action of `plan` in order and reports what failed.
pub fn run(plan: &CleanupPlan, ctx: &mut Context) -> CleanupReport {
    let start = Instant::now();
    let mut r = Run {
        ctx,
        failures: Vec::new(),
        more: 0,
        trimmed: 0,
    };
    r.actions(&plan.actions);
    let mut failures = r.failures;
    if r.more > 0 {
        failures.push(format!("... and {} more failures", r.more));
    }
    CleanupReport {
        failures,
        trimmed_bytes: r.trimmed,
        duration_ms: start.elapsed().as_millis() as u64,
    }
}

struct Run<'a> {
    ctx: &'a mut Context,
    failures: Vec<String>,
    more: usize,
    trimmed: u64,
}

impl Run<'_> {
    fn fail(&mut self, what: &str, path: &Path, e: impl std::fmt::Display) {
        let mut line = format!("{what}: {}: {e}", path.display());
        tracing::debug!("cleanup: {line}");
        if self.failures.len() + 1 >= MAX_CLEANUP_FAILURES {
            self.more += 1;
            return;
        }
        if line.len() > MAX_FAILURE_LINE {
            let mut cut = MAX_FAILURE_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.failures.push(line);
    }

    fn actions(&mut self, actions: &[CleanupAction]) {
        for a in actions {
            self.action(a);
        }
    }

    fn action(&mut self, a: &CleanupAction) {
        let what = a.describe();
        let what = what.as_str();
        match a {
            CleanupAction::Truncate(p) => {
                if let Some(p) = self.absolute(what, p) {
                    if let Err(e) = truncate(&p) {
                        self.fail("truncate", &p, e);
                    }
                }
            }
            CleanupAction::Remove(p) => self.remove(what, p),
            CleanupAction::EmptyFilesUnder(p) => {
                if let Some(p) = self.absolute(what, p) {
                    self.empty_files_under(&p);
                }
            }
            CleanupAction::WriteFile { path, mode, data } => {
                if let Some(p) = self.absolute(what, path) {
                    if let Err(e) = write_file(&p, *mode, data) {
                        self.fail("write", &p, e);
                    }
                }
            }
            CleanupAction::Symlink { target, link } => {
                if let Some(l) = self.absolute(what, link) {
                    if let Err(e) = symlink(Path::new(target), &l) {
                        self.fail(&format!("symlink to {target}"), &l, e);
                    }
                }
            }
            CleanupAction::IfExists { path, then } => {
                if let Some(p) = self.absolute(what, path) {
                    match fs::metadata(&p) {
                        Ok(_) => self.actions(then),
                        Err(e) if is_absent(&e) => {}
                        Err(e) => self.fail("if exists", &p, e),
                    }
                }
            }
            CleanupAction::Sync => {
                // SAFETY: sync(2) has no arguments and cannot fail.
                unsafe { libc::sync() };
            }
            CleanupAction::TrimAll => self.trim_all(),
        }
    }

    fn absolute(&mut self, what: &str, p: &str) -> Option<PathBuf> {
        if p.starts_with('/') {
            Some(PathBuf::from(p))
        } else {
            self.fail(what, Path::new(p), "not an absolute path");
            None
        }
    }

    fn remove(&mut self, what: &str, pattern: &str) {
        let Some(_) = self.absolute(what, pattern) else {
            return;
        };
        let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
        if comps.is_empty() {
            self.fail("remove", Path::new(pattern), "refusing to remove /");
            return;
        }
        if comps.iter().any(|c| *c == "." || *c == "..") {
            self.fail(
                "remove",
                Path::new(pattern),
                "refusing a pattern with . or .. components",
            );
            return;
        }
        let mut found = vec![PathBuf::from("/")];
        for c in comps {
            let mut next = Vec::new();
            for dir in found {
                if !has_wildcard(c) {
                    next.push(dir.join(c));
                    continue;
                }
                match fs::read_dir(&dir) {
                    Ok(entries) => {
                        for e in entries {
                            match e {
                                Ok(e) => {
                                    if glob_match(c.as_bytes(), e.file_name().as_bytes()) {
                                        next.push(e.path());
                                    }
                                }
                                Err(e) => self.fail("remove: listing", &dir, e),
                            }
                        }
                    }
                    // Like a shell glob: a missing or non-directory level matches nothing.
                    Err(e) if is_absent(&e) => {}
                    Err(e) => self.fail("remove: listing", &dir, e),
                }
            }
            found = next;
        }
        // Sorted, so the outcome (and any failure lines) do not depend on directory order.
        found.sort();
        for p in found {
            let r = match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                Ok(_) => fs::remove_file(&p),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => self.fail("remove", &p, e),
            }
        }
    }

    fn empty_files_under(&mut self, top: &Path) {
        // The top itself may be reached through a symlink (like `DIR/**` in bash); below it,
        // nothing is followed.
        let dev = match fs::metadata(top) {
            Ok(m) if m.is_dir() => m.dev(),
            Ok(_) => {
                self.fail("empty files under", top, "not a directory");
                return;
            }
            Err(e) if is_absent(&e) => return,
            Err(e) => {
                self.fail("empty files under", top, e);
                return;
            }
        };
        // An explicit stack: a deep tree cannot overflow the thread's stack.
        let mut dirs = vec![top.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.fail("empty files under", &dir, e);
                    continue;
                }
            };
            for e in entries {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        self.fail("empty files under", &dir, err);
                        continue;
                    }
                };
                let path = e.path();
                let m = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => {
                        self.fail("empty files under", &path, err);
                        continue;
                    }
                };
                if m.is_dir() {
                    if m.dev() == dev {
                        dirs.push(path);
                    }
                } else if m.is_file() && m.len() > 0 {
                    if let Err(err) = truncate_existing(&path) {
                        self.fail("empty", &path, err);
                    }
                }
            }
        }
    }

    fn trim_all(&mut self) {
        let table = match fs::read_to_string(&self.ctx.mountinfo) {
            Ok(t) => t,
            Err(e) => {
                let p = self.ctx.mountinfo.clone();
                self.fail("trim all: reading the mount table", &p, e);
                return;
            }
        };
        for m in trim_targets(&table) {
            match (self.ctx.trim)(&m) {
                Ok(n) => {
                    tracing::debug!("trimmed {n} bytes on {}", m.display());
                    self.trimmed = self.trimmed.saturating_add(n);
                }
                // No discard support, or read-only after all: skipped, like `fstrim -a`.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EROFS)
                    ) => {}
                Err(e) => self.fail("trim", &m, e),
            }
        }
    }
}

/// Not there, or a path component is not a directory: nothing to act on.
fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Opens for writing without following a final symlink and without blocking on a FIFO.
fn open_for_truncate(path: &Path, create: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(create)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other("a symlink: left alone")
            } else {
                e
            }
        })?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file: left alone"));
    }
    Ok(f)
}

/// `truncate -s 0`: a missing file is created empty.
fn truncate(path: &Path) -> io::Result<()> {
    let f = open_for_truncate(path, true)?;
    if f.metadata()?.len() > 0 {
        f.set_len(0)?;
    }
    Ok(())
}

fn truncate_existing(path: &Path) -> io::Result<()> {
    open_for_truncate(path, false)?.set_len(0)
}

fn create_parents(path: &Path) -> io::Result<&Path> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| io::Error::other("has no parent directory"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)?;
    Ok(parent)
}

/// A fresh name beside `path` for a temporary file or link.
fn temp_beside(parent: &Path, path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(".{name}.kiln-tmp-{}-{n}", std::process::id()))
}

/// Temp file, exact mode (not the umask's), rename: readers see the old or the new file.
pub(super) fn write_file(path: &Path, mode: u32, data: &[u8]) -> io::Result<()> {
    let parent = create_parents(path)?;
    let tmp = temp_beside(parent, path);
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// `ln -sf`, but atomic: a temporary link renamed over whatever file or link is there.
fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    let parent = create_parents(link)?;
    let tmp = temp_beside(parent, link);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn has_wildcard(c: &str) -> bool {
    c.contains(['*', '?'])
}

/// Shell-style matching of one path component: `*` any run of bytes, `?` one byte,
/// everything else literal. Linear time (greedy with one backtrack point).
pub(crate) fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// The mount points `fstrim -a` would trim: writable mounts of block devices (a source under
/// /dev/), each device once (the first mount listed, normally the one nearest the root).
pub(crate) fn trim_targets(mountinfo: &str) -> Vec<PathBuf> {
    block_mounts(mountinfo)
        .into_iter()
        .map(|m| m.point)
        .collect()
}

/// A writable mount of a block device, from the mount table.
pub(crate) struct BlockMount {
    pub point: PathBuf,
    pub fstype: String,
}

/// Writable mounts of block devices (a source under /dev/), each device once (the first
/// mount listed, normally the one nearest the root), in the table's order.
pub(crate) fn block_mounts(mountinfo: &str) -> Vec<BlockMount> {
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        // id parent maj:min root mount-point options [optional...] - fstype source super-options
        let Some(sep) = f.iter().skip(6).position(|x| *x == "-").map(|i| i + 6) else {
            continue;
        };
        let (Some(point), Some(opts), Some(fstype), Some(source), Some(sopts)) = (
            f.get(4),
            f.get(5),
            f.get(sep + 1),
            f.get(sep + 2),
            f.get(sep + 3),
        ) else {
            continue;
        };
        let read_only = |o: &str| o.split(',').any(|x| x == "ro");
        if read_only(opts) || read_only(sopts) || !source.starts_with("/dev/") {
            continue;
        }
        if seen.contains(source) {
            continue;
        }
        seen.push(source);
        out.push(BlockMount {
            point: PathBuf::from(unescape(point)),
            fstype: fstype.to_string(),
        });
    }
    out
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(s: &str) -> std::ffi::OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    std::ffi::OsString::from(std::ffi::OsStr::from_bytes(&out))
}

/// linux/fs.h `struct fstrim_range`.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// `_IOWR('X', 121, struct fstrim_range)` (libc does not name it).
const FITRIM: u32 =
    (3 << 30) | ((std::mem::size_of::<FstrimRange>() as u32) << 16) | (0x58 << 8) | 121;

/// FITRIM the whole file system mounted at `mount_point`; returns the bytes trimmed.
fn fitrim(mount_point: &Path) -> io::Result<u64> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(mount_point)?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes one fstrim_range, which `range` is, on an open fd.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FITRIM as _, &mut range as *mut FstrimRange) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel writes back how many bytes it trimmed.
    Ok(range.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A context whose trimmer records what it was asked and never touches the host.
    fn fake_ctx(mountinfo: PathBuf) -> (Context, Arc<Mutex<Vec<PathBuf>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let a = asked.clone();
        let ctx = Context {
            mountinfo,
            trim: Box::new(move |p: &Path| {
                a.lock().unwrap().push(p.to_path_buf());
                match p.to_str() {
                    Some("/nodiscard") => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
                    Some("/broken") => Err(io::Error::from_raw_os_error(libc::EIO)),
                    _ => Ok(4096),
                }
            }),
        };
        (ctx, asked)
    }

    fn run_in(dir: &Path, actions: Vec<CleanupAction>) -> CleanupReport {
        let (mut ctx, _) = fake_ctx(dir.join("no-mountinfo"));
        run(&CleanupPlan { actions }, &mut ctx)
    }

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn glob_matching_is_shell_like() {
        assert!(glob_match(b"ssh_host_*", b"ssh_host_rsa_key"));
        assert!(glob_match(b"ssh_host_*", b"ssh_host_"));
        assert!(!glob_match(b"ssh_host_*", b"sshd_config"));
        assert!(glob_match(b"*.deb", b"a.b.deb"));
        assert!(!glob_match(b"*.deb", b"a.deb.part"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"*", b".hidden"), "dotglob semantics");
        assert!(glob_match(b"*a*b*", b"xxaxxbxx"));
        assert!(!glob_match(b"*a*b*", b"xxbxxaxx"));
        assert!(glob_match(b"[x]", b"[x]"), "brackets are literal");
    }

    #[test]
    fn truncate_cuts_regular_files_creates_missing_and_leaves_others() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("machine-id");
        fs::write(&f, "0123456789abcdef\n").unwrap();
        let missing = d.path().join("new-id");
        let target = d.path().join("target");
        fs::write(&target, "keep").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let r = run_in(
            d.path(),
            vec![
                CleanupAction::Truncate(s(&f)),
                CleanupAction::Truncate(s(&missing)),
                CleanupAction::Truncate(s(&link)),
                CleanupAction::Truncate(s(&sub)),
                CleanupAction::Truncate("relative/path".into()),
            ],
        );
        assert_eq!(fs::metadata(&f).unwrap().len(), 0);
        assert_eq!(fs::metadata(&missing).unwrap().len(), 0);
        assert_eq!(
            fs::read(&target).unwrap(),
            b"keep",
            "a symlink is not followed"
        );
        assert_eq!(r.failures.len(), 3, "{:?}", r.failures);
        assert!(r.failures[0].contains("link") && r.failures[0].contains("symlink"));
        assert!(r.failures[1].contains("sub"));
        assert!(r.failures[2].contains("not an absolute path"));
    }

    #[test]
    fn remove_expands_wildcards_and_removes_trees_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let ssh = p.join("ssh");
        fs::create_dir(&ssh).unwrap();
        for n in ["ssh_host_rsa_key", "ssh_host_rsa_key.pub", "sshd_config"] {
            fs::write(ssh.join(n), n).unwrap();
        }
        // A tree with a symlink that points outside: the outside must survive.
        let outside = p.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), "x").unwrap();
        let tree = p.join("cloud/instances/i-1");
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("escape")).unwrap();
        // A symlink as the thing removed: the link goes, its target stays.
        std::os::unix::fs::symlink(&outside, p.join("cloud/instance")).unwrap();
        // Wildcards in a middle component, and dotfiles.
        for n in ["kiln-a", "kiln-b", "other"] {
            fs::create_dir_all(p.join("tmp").join(n)).unwrap();
            fs::write(p.join("tmp").join(n).join(".hidden"), "x").unwrap();
            fs::write(p.join("tmp").join(n).join("log"), "x").unwrap();
        }
        let r = run_in(
            p,
            vec![
                CleanupAction::Remove(format!("{}/ssh_host_*", s(&ssh))),
                CleanupAction::Remove(format!("{}/cloud/instances", s(p))),
                CleanupAction::Remove(format!("{}/cloud/instance", s(p))),
                CleanupAction::Remove(format!("{}/tmp/kiln-*/*", s(p))),
                CleanupAction::Remove(format!("{}/nothing/here*", s(p))),
                CleanupAction::Remove(format!("{}/nothing", s(p))),
                CleanupAction::Remove(format!("{}/../x", s(p))),
                CleanupAction::Remove("/".into()),
            ],
        );
        let names = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&ssh), ["sshd_config"]);
        assert!(!p.join("cloud/instances").exists());
        assert!(fs::symlink_metadata(p.join("cloud/instance")).is_err());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"x");
        assert!(names(&p.join("tmp/kiln-a")).is_empty());
        assert!(names(&p.join("tmp/kiln-b")).is_empty());
        assert_eq!(names(&p.join("tmp/other")), [".hidden", "log"]);
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);
        assert!(r.failures[0].contains(". or .."), "{:?}", r.failures);
        assert!(r.failures[1].contains("refusing to remove /"));
    }

    #[test]
    fn empty_files_under_truncates_recursively_but_not_through_links() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        fs::create_dir_all(log.join("apt/deeper")).unwrap();
        fs::write(log.join("syslog"), "lots").unwrap();
        fs::write(log.join(".dotfile"), "x").unwrap();
        fs::write(log.join("apt/deeper/history.log"), "x").unwrap();
        fs::write(log.join("empty"), "").unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, log.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), log.join("filelink")).unwrap();
        let before = fs::metadata(log.join("empty")).unwrap().modified().unwrap();
        let r = run_in(
            d.path(),
            vec![
                CleanupAction::EmptyFilesUnder(s(&log)),
                CleanupAction::EmptyFilesUnder(s(&d.path().join("missing"))),
            ],
        );
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        for f in ["syslog", ".dotfile", "apt/deeper/history.log", "empty"] {
            assert_eq!(fs::metadata(log.join(f)).unwrap().len(), 0, "{f}");
        }
        assert_eq!(
            fs::metadata(log.join("empty")).unwrap().modified().unwrap(),
            before,
            "an empty file is not touched"
        );
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
        assert!(fs::symlink_metadata(log.join("dirlink"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn write_file_is_atomic_with_exact_mode_and_parents() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("etc/systemd/system/x.service");
        let r = run_in(
            d.path(),
            vec![CleanupAction::WriteFile {
                path: s(&f),
                mode: 0o640,
                data: b"[Unit]\n".to_vec(),
            }],
        );
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(fs::read(&f).unwrap(), b"[Unit]\n");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        // Replacing: a reader holding the old file keeps the old bytes (rename, not rewrite).
        let old = File::open(&f).unwrap();
        let old_ino = old.metadata().unwrap().ino();
        let r = run_in(
            d.path(),
            vec![CleanupAction::WriteFile {
                path: s(&f),
                mode: 0o644,
                data: b"new".to_vec(),
            }],
        );
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(fs::read(&f).unwrap(), b"new");
        assert_ne!(fs::metadata(&f).unwrap().ino(), old_ino);
        let leftovers: Vec<_> = fs::read_dir(f.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("kiln-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A directory in the way is a reported failure, and no temporary file stays.
        let dir = d.path().join("adir");
        fs::create_dir(&dir).unwrap();
        let r = run_in(
            d.path(),
            vec![CleanupAction::WriteFile {
                path: s(&dir),
                mode: 0o644,
                data: vec![],
            }],
        );
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert!(!fs::read_dir(d.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("kiln-tmp")));
    }

    #[test]
    fn symlink_replaces_links_and_files() {
        let d = tempfile::tempdir().unwrap();
        let wants = d.path().join("multi-user.target.wants");
        let link = wants.join("x.service");
        let target = "/etc/systemd/system/x.service";
        let r = run_in(
            d.path(),
            vec![CleanupAction::Symlink {
                target: target.into(),
                link: s(&link),
            }],
        );
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(fs::read_link(&link).unwrap(), Path::new(target));
        // Over an existing link to elsewhere, and over a plain file.
        for setup in [0, 1] {
            fs::remove_file(&link).unwrap();
            if setup == 0 {
                std::os::unix::fs::symlink("/elsewhere", &link).unwrap();
            } else {
                fs::write(&link, "plain").unwrap();
            }
            let r = run_in(
                d.path(),
                vec![CleanupAction::Symlink {
                    target: target.into(),
                    link: s(&link),
                }],
            );
            assert!(r.failures.is_empty(), "{:?}", r.failures);
            assert_eq!(fs::read_link(&link).unwrap(), Path::new(target));
        }
    }

    #[test]
    fn if_exists_guards_its_actions() {
        let d = tempfile::tempdir().unwrap();
        let there = d.path().join("there");
        fs::create_dir(&there).unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let r = run_in(
            d.path(),
            vec![
                CleanupAction::IfExists {
                    path: s(&there),
                    then: vec![CleanupAction::WriteFile {
                        path: s(&a),
                        mode: 0o644,
                        data: vec![],
                    }],
                },
                CleanupAction::IfExists {
                    path: s(&d.path().join("absent")),
                    then: vec![CleanupAction::WriteFile {
                        path: s(&b),
                        mode: 0o644,
                        data: vec![],
                    }],
                },
                CleanupAction::Sync,
            ],
        );
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(a.exists());
        assert!(!b.exists());
    }

    #[test]
    fn trim_targets_are_writable_block_devices_once_each() {
        let table = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=100k
25 22 0:22 / /run rw,nosuid - tmpfs tmpfs rw,size=1000k
26 22 254:2 / /boot\\040efi rw,relatime shared:3 - vfat /dev/vda2 rw
27 22 254:3 / /mnt/ro ro,relatime - ext4 /dev/vdb rw
28 22 254:4 / /mnt/sro rw,relatime - ext4 /dev/vdc ro
29 22 254:1 /srv /srv rw,relatime - ext4 /dev/vda1 rw
30 22 7:0 / /nodiscard rw - ext4 /dev/loop0 rw
31 22 7:1 / /broken rw - ext4 /dev/loop1 rw
garbage line
";
        assert_eq!(
            trim_targets(table),
            ["/", "/boot efi", "/nodiscard", "/broken"]
                .iter()
                .map(PathBuf::from)
                .collect::<Vec<_>>()
        );
        let d = tempfile::tempdir().unwrap();
        let mi = d.path().join("mountinfo");
        fs::write(&mi, table).unwrap();
        let (mut ctx, asked) = fake_ctx(mi);
        let r = run(
            &CleanupPlan {
                actions: vec![CleanupAction::TrimAll],
            },
            &mut ctx,
        );
        assert_eq!(asked.lock().unwrap().len(), 4);
        // EOPNOTSUPP is skipped silently; EIO is reported.
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert!(r.failures[0].contains("/broken"), "{:?}", r.failures);
        assert_eq!(r.trimmed_bytes, 2 * 4096);
        // A missing mount table is one failure, not a panic.
        let (mut ctx, asked) = fake_ctx(d.path().join("missing"));
        let r = run(
            &CleanupPlan {
                actions: vec![CleanupAction::TrimAll],
            },
            &mut ctx,
        );
        assert_eq!(r.failures.len(), 1);
        assert!(asked.lock().unwrap().is_empty());
    }

    #[test]
    fn failures_are_capped_so_a_report_fits_a_frame() {
        let d = tempfile::tempdir().unwrap();
        let long = "x".repeat(3000);
        let actions = (0..MAX_CLEANUP_FAILURES + 50)
            .map(|i| CleanupAction::Truncate(format!("rel/{i}/{long}")))
            .collect();
        let r = run_in(d.path(), actions);
        assert_eq!(r.failures.len(), MAX_CLEANUP_FAILURES);
        assert!(r.failures.iter().all(|l| l.len() <= MAX_FAILURE_LINE));
        assert_eq!(
            r.failures.last().unwrap(),
            &format!("... and {} more failures", 51)
        );
        let mut body = Vec::new();
        crate::message::Message::CleanupDone(r).encode_body(&mut body);
        assert!(body.len() < crate::frame::MAX_PAYLOAD);
    }
}
