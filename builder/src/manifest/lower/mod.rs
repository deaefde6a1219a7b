//! From the checked tree to a [`Plan`]: defaults, reference resolution, semantic checks
//! (duplicates, dangling references, address plans, limits) and the build/base views.

mod network;
mod read;
mod resources;
mod steps;
mod vm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::is_envelope;
use super::diag::{Sink, Span};
use super::plan::{FileContent, FileEntry, Plan, View, Vm};
use super::suggest::closest;
use super::yaml::Node;
use super::Limits;

pub(crate) use read::is_dns_label;

/// `isoCacheTTL`'s default: a cached ISO is hashed again once its last check is older.
const ISO_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

pub(crate) struct Cx<'s, 'a> {
    pub sink: &'s mut Sink<'a>,
    pub dir: PathBuf,
    pub limits: Limits,
    pub module: String,
    pub timeout: Duration,
    pub files: Vec<FileEntry>,
    /// MACs written in the manifest, so derived ones never collide with them.
    pub explicit_macs: HashSet<String>,
}

impl Cx<'_, '_> {
    /// Report a name that is not a DNS label.
    pub fn label(&mut self, n: &Node, what: &str) -> bool {
        let Some(s) = n.as_str() else { return false };
        if is_dns_label(s) {
            return true;
        }
        self.sink
            .error(n.span, format!("{what} `{s}` is not a DNS label"))
            .hint(format!(
                "use lowercase letters, digits and `-`, at most 63 characters, e.g. `{}`",
                read::label_suggestion(s)
            ));
        false
    }

    /// Report names used twice in a list; `key` is the name field.
    pub fn unique_names(&mut self, items: &[Node], key: &str, what: &str) {
        for (i, item) in items.iter().enumerate() {
            let Some(n) = item.get(key) else { continue };
            let Some(name) = n.as_str() else { continue };
            if let Some(first) = items[..i]
                .iter()
                .filter_map(|p| p.get(key))
                .find(|p| p.as_str() == Some(name))
            {
                self.sink
                    .error(n.span, format!("duplicate {what} name `{name}`"))
                    .hint(format!("first defined on line {}", first.span.start.line));
            }
        }
    }

    /// A name that must be one of `names`.
    pub fn reference(&mut self, n: &Node, what: &str, names: &[String]) -> Option<String> {
        let s = n.as_str()?;
        if names.iter().any(|x| x == s) {
            return Some(s.to_string());
        }
        let b = self
            .sink
            .error(n.span, format!("{what} `{s}` is not defined"));
        match closest(s, names.iter().map(String::as_str)) {
            Some(c) => b.hint(format!("did you mean `{c}`?")),
            None if names.is_empty() => b.hint(format!("no {what}s are declared")),
            None => b.hint(format!("declared: {}", names.join(", "))),
        };
        None
    }

    /// A ConfigMap/Secret reference read as a local path; must exist.
    pub fn config_ref(&mut self, n: &Node) -> Option<PathBuf> {
        let kinds: Vec<&Node> = ["configMapRef", "secretRef"]
            .iter()
            .filter_map(|k| n.key(k))
            .collect();
        match kinds.len() {
            0 => {
                self.sink
                    .error(
                        n.span,
                        "the reference has neither `configMapRef` nor `secretRef`",
                    )
                    .hint("write `configMapRef: {name: path/to/file}`");
                return None;
            }
            1 => {}
            _ => {
                self.sink
                    .error(
                        kinds[1].span,
                        "the reference has both `configMapRef` and `secretRef`",
                    )
                    .hint("keep one");
                return None;
            }
        }
        let r = n.get(kinds[0].as_str()?)?;
        self.local_path(r)
    }

    /// `{name, key?}` as the path `name` (or `name/key`) relative to the manifest; must exist.
    pub fn local_path(&mut self, r: &Node) -> Option<PathBuf> {
        let name = read::string(r, "name")?;
        let rel = match read::string(r, "key") {
            Some(k) => Path::new(&name).join(k),
            None => PathBuf::from(&name),
        };
        self.existing_file(r.get("name").map_or(r.span, |n| n.span), &rel)
    }

    pub fn existing_file(&mut self, at: Span, rel: &Path) -> Option<PathBuf> {
        let full = self.dir.join(rel);
        if full.is_file() {
            Some(full)
        } else {
            self.sink
                .error(
                    at,
                    format!("`{}` does not exist next to the manifest", rel.display()),
                )
                .hint("paths are relative to the manifest's directory");
            None
        }
    }

    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }
}

/// Lower a structurally checked tree. Returns `None` only when the tree is too broken to plan;
/// callers still decide validity from the diagnostics.
pub(crate) fn lower(
    root: &Node,
    stem: &str,
    dir: &Path,
    limits: Limits,
    sink: &mut Sink,
) -> Option<Plan> {
    let (spec, module) = if is_envelope(root) {
        let spec = root.get("spec")?;
        let name = root.get("metadata").and_then(|m| m.get("name"));
        let module = match name {
            Some(n) => {
                let mut cx_label_ok = true;
                if let Some(s) = n.as_str() {
                    if !is_dns_label(s) {
                        sink.error(n.span, format!("module name `{s}` is not a DNS label"))
                            .hint(format!(
                                "use lowercase letters, digits and `-`, e.g. `{}`",
                                read::label_suggestion(s)
                            ));
                        cx_label_ok = false;
                    }
                }
                match n.as_str() {
                    Some(s) if cx_label_ok => s.to_string(),
                    _ => read::label_suggestion(stem),
                }
            }
            None => read::label_suggestion(stem),
        };
        (spec, module)
    } else {
        (root, read::label_suggestion(stem))
    };
    spec.as_map()?;
    let timeout = read::duration(spec, "timeout").unwrap_or(Duration::from_secs(30 * 60));
    if timeout.is_zero() {
        if let Some(n) = spec.get("timeout") {
            sink.error(n.span, "the build timeout cannot be zero");
        }
    }
    let explicit_macs = collect_macs(spec);
    let mut cx = Cx {
        sink,
        dir: dir.to_path_buf(),
        limits,
        module,
        timeout,
        files: Vec::new(),
        explicit_macs,
    };
    cx.files = files(&mut cx, read::list(spec, "files"));
    let http_directory = name_refs(&mut cx, spec.get("httpDirectory"), "httpDirectory");

    let net = network::declared(&mut cx, spec.get("network"));
    let vm_nodes = read::list(spec, "vms");
    if vm_nodes.is_empty() {
        let at = spec.key("vms").map_or(spec.span, |k| k.span);
        if spec.get("vms").is_some() {
            cx.sink
                .error(at, "`vms` is empty: a module needs at least one VM");
        }
    }
    cx.unique_names(vm_nodes, "name", "VM");
    let mut vms = Vec::new();
    for v in vm_nodes {
        if let Some(vm) = vm::vm(&mut cx, v, &net) {
            vms.push(vm);
        }
    }
    let overrides = spec.get("buildOverrides");
    let (build_net, build_vms) = network::apply_overrides(&mut cx, overrides, &net, &vms, vm_nodes);
    network::check_view(&mut cx, &net.plan, &vms.iter().collect::<Vec<_>>());
    network::check_view(&mut cx, &build_net, &build_vms.iter().collect::<Vec<_>>());
    let base = View {
        // The floppy is build-only: clones never see it.
        vms: vms
            .into_iter()
            .map(|v| Vm {
                floppy_files: Vec::new(),
                ..v.vm
            })
            .collect(),
        network: net.plan.clone(),
    };
    let build = View {
        vms: build_vms.into_iter().map(|v| v.vm).collect(),
        network: build_net,
    };

    let iso_cache_ttl = read::duration(spec, "isoCacheTTL").unwrap_or(ISO_CACHE_TTL);

    Some(Plan {
        module: cx.module.clone(),
        manifest_dir: cx.dir.clone(),
        build,
        base,
        files: cx.files.clone(),
        http_directory,
        timeout,
        retries: read::int(spec, "retries")
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0),
        iso_cache_ttl,
    })
}

fn collect_macs(spec: &Node) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut nic_lists: Vec<&Node> = Vec::new();
    for v in read::list(spec, "vms") {
        nic_lists.extend(read::list(v, "nics"));
    }
    if let Some(o) = spec.get("buildOverrides") {
        for v in read::list(o, "vms") {
            nic_lists.extend(read::list(v, "nics"));
        }
    }
    for n in nic_lists {
        if let Some(m) = read::string(n, "mac").and_then(|m| super::netaddr::parse_mac(&m).ok()) {
            out.insert(m);
        }
    }
    out
}

fn files(cx: &mut Cx, items: &[Node]) -> Vec<FileEntry> {
    cx.unique_names(items, "name", "file");
    let mut out = Vec::new();
    for f in items {
        let Some(name_node) = f.get("name") else {
            continue;
        };
        let Some(name) = name_node.as_str() else {
            continue;
        };
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains(['/', '\\', '\0'])
            || name.len() > 255
        {
            cx.sink
                .error(
                    name_node.span,
                    format!("file name `{name}` is not a plain file name"),
                )
                .hint("a file name has no `/` and is not `.` or `..`");
            continue;
        }
        let inline = f.key("inline");
        let url = f.key("url");
        let content = match (inline, url) {
            (Some(_), Some(u)) => {
                cx.sink
                    .error(u.span, format!("file `{name}` has both `inline` and `url`"))
                    .hint("keep one");
                continue;
            }
            (None, None) => {
                cx.sink
                    .error(name_node.span, format!("file `{name}` has no contents"))
                    .hint("add `inline: ...` or `url: https://...`");
                continue;
            }
            (Some(_), None) => FileContent::Inline(read::string(f, "inline").unwrap_or_default()),
            (None, Some(_)) => {
                let u = read::string(f, "url").unwrap_or_default();
                if !read::is_http_url(&u) {
                    if let Some(n) = f.get("url") {
                        cx.sink
                            .error(n.span, format!("`{u}` is not an http:// or https:// URL"));
                    }
                    continue;
                }
                FileContent::Url(u)
            }
        };
        if !out.iter().any(|e: &FileEntry| e.name == name) {
            out.push(FileEntry {
                name: name.to_string(),
                content,
            });
        }
    }
    out
}

/// `{files: [{name}]}` resolved against `files[]`.
pub(crate) fn name_refs(cx: &mut Cx, n: Option<&Node>, what: &str) -> Vec<String> {
    let Some(n) = n else { return Vec::new() };
    let items = read::list(n, "files");
    let known = cx.file_names();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(name) = item.get("name") else {
            continue;
        };
        if let Some(s) = name.as_str() {
            if items[..i]
                .iter()
                .any(|p| p.get("name").and_then(Node::as_str) == Some(s))
            {
                cx.sink
                    .error(name.span, format!("`{s}` is listed twice in {what}"));
                continue;
            }
        }
        if let Some(r) = cx.reference(name, "file", &known) {
            out.push(r);
        }
    }
    out
}
