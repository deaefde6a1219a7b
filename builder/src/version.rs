//! Which kiln this is: the crate version and the git commit it was built from (`build.rs`).

/// The release, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit, 12 hex digits, or `unknown` for a build outside a git checkout.
pub const COMMIT: &str = env!("KILN_GIT_COMMIT");
/// `0.1.0 (commit 0123456789ab)`: what `kiln --version` prints and caches key on.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KILN_GIT_COMMIT"),
    ")"
);
