//! The module manifest: parsing (serde-saphyr's parser into a located tree), the structural
//! check against the schema tables, semantic validation, the typed [`Plan`], canonical
//! formatting and the JSON Schema.
//!
//! Entry point: [`load`] reads a manifest and returns every diagnostic at once and, when there
//! are no errors, the [`Plan`].

pub mod boot;
mod check;
pub mod diag;
pub mod fmt;
mod fuzz;
pub mod json_schema;
mod lower;
mod netaddr;
pub mod plan;
pub mod schema;
mod suggest;
pub mod units;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use boot::BootEvent;
pub use diag::{Diagnostic, Severity};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use plan::*;

/// Largest manifest file read; real manifests are a few KiB.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Validation limits. `Default` is what the docs promise; [`Limits::from_env`] lets the host
/// configuration raise the disk size limit (`KILN_MAX_DISK_SIZE=100Gi`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_disks: usize,
    pub max_disk_bytes: u64,
    pub max_cpus: u32,
    pub min_memory: u64,
    pub max_memory: u64,
    pub yaml: yaml::Limits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_disks: 3,
            max_disk_bytes: 50 << 30,
            max_cpus: 64,
            min_memory: 64 << 20,
            max_memory: 256 << 30,
            yaml: yaml::Limits::default(),
        }
    }
}

impl Limits {
    pub fn from_env() -> Self {
        let mut l = Limits::default();
        if let Some(b) = std::env::var("KILN_MAX_DISK_SIZE")
            .ok()
            .and_then(|v| units::parse_bytes(&v).ok())
        {
            l.max_disk_bytes = b;
        }
        l
    }
}

/// A manifest that could be read (it may still be invalid).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// `Some` exactly when there are no errors.
    pub plan: Option<Plan>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }
    /// The plan, or every error as one [`LoadError::Invalid`].
    pub fn into_plan(self) -> Result<Plan, LoadError> {
        match self.plan {
            Some(p) => Ok(p),
            None => Err(LoadError::Invalid {
                path: self.path,
                diagnostics: self
                    .diagnostics
                    .into_iter()
                    .filter(Diagnostic::is_error)
                    .collect(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read manifest {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "manifest {path} is invalid:\n{}",
        diagnostics.iter().map(Diagnostic::render).collect::<String>()
    )]
    Invalid {
        path: PathBuf,
        /// The errors, in file order (for `--json` callers).
        diagnostics: Vec<Diagnostic>,
    },
}

/// Read and validate a manifest file. `Err` only when the file cannot be read at all; problems
/// with its contents (including non-UTF-8 and oversize files) are diagnostics.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    load_with(path, Limits::from_env())
}

pub fn load_with(path: &Path, limits: Limits) -> Result<Loaded, LoadError> {
    load_file(path, limits).map(|(loaded, _)| loaded)
}

/// [`load_with`], also giving the text it read (`None` when it read none, or not UTF-8), so
/// a caller that keeps the manifest's text does not read the file a second time.
pub fn load_file(path: &Path, limits: Limits) -> Result<(Loaded, Option<String>), LoadError> {
    let unreadable = |source| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.is_dir() {
        return Err(unreadable(std::io::Error::other("is a directory")));
    }
    let display = path.display().to_string();
    if meta.len() > MAX_FILE_BYTES {
        let d = Diagnostic {
            severity: Severity::Error,
            file: display,
            line: 1,
            column: 1,
            end_column: 2,
            message: format!(
                "the manifest is {} bytes: the limit is {} MiB",
                meta.len(),
                MAX_FILE_BYTES >> 20
            ),
            text: None,
            hint: Some("is this really a manifest?".into()),
        };
        return Ok((
            Loaded {
                path: path.to_path_buf(),
                diagnostics: vec![d],
                plan: None,
            },
            None,
        ));
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    // Relative paths inside the manifest resolve against its real directory, so the plan
    // stays right whatever the current directory is later; messages keep the name as given.
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let loaded = load_inner(&bytes, path, dir, limits);
    Ok((loaded, String::from_utf8(bytes).ok()))
}

/// Validate manifest bytes as if read from `path` (which names the module and anchors
/// relative paths; it need not exist).
pub fn load_bytes(bytes: &[u8], path: &Path, limits: Limits) -> Loaded {
    load_inner(bytes, path, None, limits)
}

fn load_inner(bytes: &[u8], path: &Path, dir: Option<PathBuf>, limits: Limits) -> Loaded {
    let display = path.display().to_string();
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            let col = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
            let d = Diagnostic {
                severity: Severity::Error,
                file: display,
                line,
                column: col,
                end_column: col + 1,
                message: format!(
                    "the manifest is not UTF-8: invalid byte 0x{:02x}",
                    bytes[e.valid_up_to()]
                ),
                text: None,
                hint: Some("save the file as UTF-8".into()),
            };
            return Loaded {
                path: path.to_path_buf(),
                diagnostics: vec![d],
                plan: None,
            };
        }
    };
    load_text(text, path, dir, limits)
}

/// Validate manifest text as if read from `path`.
pub fn load_str(text: &str, path: &Path, limits: Limits) -> Loaded {
    load_text(text, path, None, limits)
}

fn load_text(text: &str, path: &Path, dir: Option<PathBuf>, limits: Limits) -> Loaded {
    let mut sink = diag::Sink::new(path.display().to_string(), text);
    let plan = match yaml::parse(text, limits.yaml) {
        Err(e) => {
            let b = sink.error(e.span, e.message);
            if let Some(h) = e.hint {
                b.hint(h);
            }
            None
        }
        Ok(root) => {
            check::check_root(&root, &mut sink);
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "module".into());
            let dir = dir
                .or_else(|| path.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            lower::lower(&root, &stem, &dir, limits, &mut sink)
        }
    };
    let diagnostics = sink.finish();
    let ok = !diagnostics.iter().any(Diagnostic::is_error);
    Loaded {
        path: path.to_path_buf(),
        diagnostics,
        plan: if ok { plan } else { None },
    }
}
