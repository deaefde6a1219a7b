//! Starting the `kiln build --json` child of a build and reading its output lines into the
//! build's [`BuildRun`].

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::run::BuildRun;
use super::{BuildConfig, BuildStartError};

/// Longest event line read from the child; longer ones are cut.
const MAX_LINE: usize = 256 << 10;

/// Runs the child on a thread of its own that lives exactly as long as the child: the child
/// gets SIGINT when that thread ends (PR_SET_PDEATHSIG follows the spawning thread), which
/// happens only if the server dies first, so a build never outlives its editor.
pub(super) fn spawn(
    cfg: &BuildConfig,
    run: Arc<BuildRun>,
    path: &Path,
) -> Result<(), BuildStartError> {
    let mut cmd = Command::new(&cfg.program);
    // `--force`: the editor's Build button is its edit-build loop, a rebuild is what was
    // asked for, and clones of the module it replaces keep their own links to the old disks.
    cmd.arg("build")
        .arg("--json")
        .arg("--output")
        .arg(&cfg.output)
        .arg(path)
        .arg("--force")
        .args(cfg.no_cache.then_some("--no-cache"))
        .env("KILN_RUN_DIR", &cfg.run_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::serve::child::interrupted_with_server(&mut cmd);
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), std::io::Error>>();
    let output = cfg.output.clone();
    let program = cfg.program.clone();
    std::thread::Builder::new()
        .name(format!("build-{}", run.id))
        .spawn(move || {
            let mut child: Child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            {
                let mut inner = run.lock();
                inner.pid = Some(child.id());
                inner.child_pid = Some(child.id());
            }
            let _ = tx.send(Ok(()));
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let mut readers = 0;
            for (i, r) in [
                child
                    .stdout
                    .take()
                    .map(|o| Box::new(o) as Box<dyn Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|e| Box::new(e) as Box<dyn Read + Send>),
            ]
            .into_iter()
            .enumerate()
            {
                let Some(r) = r else { continue };
                let (run, done_tx) = (run.clone(), done_tx.clone());
                readers += 1;
                std::thread::spawn(move || {
                    read_lines(r, |line| {
                        if i == 0 {
                            run.on_event_line(line)
                        } else {
                            run.on_stderr_line(line)
                        }
                    });
                    let _ = done_tx.send(());
                });
            }
            drop(done_tx);
            // Wait for the child, reaping it under the lock that `cancel` signals under.
            let exit = loop {
                {
                    let mut inner = run.lock();
                    match child.try_wait() {
                        Ok(Some(st)) => {
                            inner.pid = None;
                            break Ok(st);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            inner.pid = None;
                            break Err(e);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            // Read what the child printed last. A VM process it left behind could hold the
            // pipes open: do not wait for that forever.
            let until = Instant::now() + Duration::from_secs(5);
            for _ in 0..readers {
                let left = until.saturating_duration_since(Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            let mut inner = run.lock();
            run.finish(&mut inner, exit, &output);
            drop(inner);
            run.changed.notify_all();
        })
        .map_err(|source| BuildStartError::Spawn {
            program: program.clone(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(BuildStartError::Spawn { program, source }),
        Err(_) => Err(BuildStartError::Spawn {
            program,
            source: std::io::Error::other("the build thread ended early"),
        }),
    }
}

/// Calls `f` with each line, cut to [`MAX_LINE`] bytes, invalid UTF-8 replaced.
fn read_lines(r: Box<dyn Read + Send>, mut f: impl FnMut(&str)) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) => {
                let cut = buf.last() != Some(&b'\n');
                let text = String::from_utf8_lossy(&buf);
                f(text.trim_end_matches(['\n', '\r']));
                if cut {
                    // Skip the rest of an overlong line.
                    let mut rest = Vec::new();
                    loop {
                        rest.clear();
                        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut rest) {
                            Ok(0) => return,
                            Ok(_) if rest.last() == Some(&b'\n') => break,
                            Ok(_) => continue,
                            Err(_) => return,
                        }
                    }
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_the_rest_skipped() {
        let mut data = vec![b'x'; MAX_LINE + 10];
        data.extend_from_slice(b"\nnext\n");
        let mut lines = Vec::new();
        read_lines(Box::new(std::io::Cursor::new(data)), |l| {
            lines.push(l.len())
        });
        assert_eq!(lines, vec![MAX_LINE, 4]);
    }
}
