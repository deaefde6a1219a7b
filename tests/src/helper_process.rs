//! A test that needs a second process re-runs its own test binary on one `#[ignore]`d helper
//! test (a writer to kill, a VMM child, a process holding a VM).

use std::process::Command;

/// This test binary, asked to run exactly the ignored test `test` of the module whose
/// `module_path!()` is `module_path`, with its output shown and on one thread.
///
/// The crate segment of `module_path` (`it` in `tests/it/main.rs`) is not part of libtest's
/// test names, so it is dropped: `it::crash` and `crash_child` give `crash::crash_child`.
pub fn command(module_path: &str, test: &str) -> Command {
    let name = match module_path.split_once("::") {
        Some((_, module)) => format!("{module}::{test}"),
        None => test.to_string(),
    };
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary's path"));
    cmd.args([
        name.as_str(),
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}
