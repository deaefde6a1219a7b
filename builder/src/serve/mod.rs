//! `kiln serve`: the local web editor. A small bounded HTTP server ([`http`]) serves the
//! embedded web app and a JSON API over one folder of manifests. It binds to loopback unless
//! told otherwise; every request must name this server in `Host` and, if it has an `Origin`,
//! come from the editor's own page ([`host`]: against DNS rebinding and cross-site requests),
//! and carry the per-run token (in the `token` query parameter or the `X-Kiln-Token` header),
//! so other local users and web pages cannot drive it.
//!
//! API (all under the token):
//! - `GET /api/manifests` -> `{dir, names}`
//! - `GET /api/manifest?name=N` -> `{name, text}`
//! - `PUT /api/manifest?name=N` (body: text) -> `{saved}`; written atomically
//! - `POST /api/check?name=N` (body: text) -> `{diagnostics: [{severity, line, column,
//!   message, hint, path}], doc}`: the validator's diagnostics, each with the path of its
//!   field, and the document as JSON (null when the YAML does not parse)
//! - `POST /api/yaml` (body: `{doc, original?}`) -> `{text}`: canonical YAML of a document
//! - `GET /api/schema` -> the manifest's JSON Schema (as `kiln schema` prints it), for the
//!   YAML editor's completion and hover help ([`schema`])
//! - `GET /api/builds` -> `{builds: [{id, manifest, module, status, phase, startedAt,
//!   endedAt, durationMs, vms: [{name, phase, paused}]}]}`, oldest first (running builds and
//!   the last 50 finished); `POST /api/builds?name=N` starts `kiln build` of the saved
//!   manifest N -> `state` (409 while a build of the same manifest or module runs; builds
//!   of others run alongside)
//! - `GET /api/builds/ID` -> `state`; `GET /api/builds/ID/events` -> Server-Sent Events
//!   (see [`sse`]); `POST /api/builds/ID/cancel`; `POST /api/builds/ID/resume?vm=V` ends a
//!   handbuild pause
//! - `GET /api/builds/ID/logs` -> `{files: [{name, size}]}`: the build's log files (each
//!   VM's log and serial log, boot-command screenshots, `events.jsonl`); `GET
//!   /api/builds/ID/logs/FILE[?download=1]` sends one (as an attachment with `download`);
//!   only plain files directly in the build's log folder, never a link
//! - `GET /api/builds/ID/consoles` -> `{consoles: [{vm, password}]}`: the running build's VMs
//!   with a console now (not `invisible` ones); `GET /api/builds/ID/console?vm=V` is a
//!   WebSocket carrying that VM's VNC stream ([`console`])
//! - `GET /api/clones/C/vms/V/terminal?rows=R&cols=C` is a WebSocket to a login shell on a
//!   terminal in VM V of the running clone C ([`terminal`])
//!
//! - Modules and clones (`/api/modules...`, `/api/clones...`): see [`modules`]
//!
//! Requests are served by a few worker threads; an event stream gets a thread of its own, so
//! a page watching a build never holds up another request.

mod assets;
pub mod build;
mod child;
mod clone_runs;
mod console;
pub mod doc;
pub mod host;
pub mod http;
pub mod modules;
mod schema;
mod sse;
pub mod store;
mod terminal;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use http::{Request, Server};

pub use build::{BuildConfig, Builds};
pub use modules::{Modules, ModulesConfig};
pub use store::{Store, StoreError};

/// Threads that serve ordinary requests.
const WORKERS: usize = 4;
/// Event streams open at once; more get 503.
const MAX_STREAMS: usize = 32;

/// Largest request body accepted: a manifest plus JSON overhead.
const MAX_BODY: u64 = 2 * crate::manifest::MAX_FILE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a token: {0}")]
    Token(#[source] std::io::Error),
    #[error("{0} is not a folder")]
    NotADir(PathBuf),
}

pub struct Config {
    /// The folder of manifests.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// How builds started from the page run.
    pub build: BuildConfig,
    /// The clones folder (the modules folder is the builds' output).
    pub clones: PathBuf,
}

/// A bound server, ready to run.
pub struct Serve {
    server: Server,
    shared: Arc<Shared>,
    addr: SocketAddr,
}

struct Shared {
    store: Store,
    token: String,
    allowed: host::Allowed,
    builds: Builds,
    modules: Modules,
    streams: AtomicUsize,
}

impl Serve {
    pub fn bind(cfg: Config) -> Result<Serve, ServeError> {
        if !cfg.dir.is_dir() {
            return Err(ServeError::NotADir(cfg.dir));
        }
        let server = Server::bind(cfg.listen).map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = server.addr();
        Ok(Serve {
            server,
            shared: Arc::new(Shared {
                store: Store::new(cfg.dir),
                token: new_token().map_err(ServeError::Token)?,
                allowed: host::Allowed::new(addr),
                modules: Modules::new(ModulesConfig {
                    modules: cfg.build.output.clone(),
                    clones: cfg.clones,
                    program: cfg.build.program.clone(),
                    run_root: cfg.build.run_root.clone(),
                }),
                builds: Builds::new(cfg.build),
                streams: AtomicUsize::new(0),
            }),
            addr,
        })
    }

    /// The URL to open, token included.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.shared.token)
    }

    /// Serve until the process ends.
    pub fn run(self) {
        let shared = self.shared.clone();
        self.server
            .run(WORKERS, Arc::new(move |req| handle(&shared, req)));
        self.shared.builds.cancel_all();
        self.shared.modules.stop_all();
    }
}

fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

fn query(url: &str, key: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(v)) => {
                    out.push(v);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(req: Request, status: u16, content_type: &str, body: Vec<u8>) {
    req.respond(status, content_type, &body);
}

fn respond_json(req: Request, status: u16, v: &Value) {
    respond(req, status, "application/json", v.to_string().into_bytes());
}

fn error(req: Request, status: u16, message: impl std::fmt::Display) {
    respond_json(req, status, &json!({ "error": message.to_string() }));
}

fn handle(shared: &Arc<Shared>, mut req: Request) {
    let (store, token) = (&shared.store, shared.token.as_str());
    if let Err(e) = shared
        .allowed
        .check(req.header("Host"), req.header("Origin"))
    {
        return error(req, 403, e);
    }
    let url = req.target.clone();
    let path = url.split('?').next().unwrap_or("/").to_string();
    // The page itself may be fetched only with the token in its URL; its scripts send the
    // header. Comparing all bytes keeps the check's time independent of where it differs.
    let given = req
        .header("X-Kiln-Token")
        .map(str::to_string)
        .or_else(|| query(&url, "token"));
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0, |a, (x, y)| a | (x ^ y))
                == 0
    });
    let is_asset = matches!(path.as_str(), "/app.js" | "/app.css");
    if !ok && !is_asset {
        return error(
            req,
            403,
            "a valid token is required: open the URL kiln serve printed",
        );
    }
    let method = req.method.clone();
    let method = method.as_str();
    if !path.starts_with("/api/") {
        return match (method, assets::get(&path)) {
            ("GET", Some(a)) => respond(req, 200, a.content_type, a.body.into_owned()),
            _ => error(req, 404, format!("no page {path}")),
        };
    }
    let mut body = String::new();
    if matches!(method, "PUT" | "POST") {
        match req.read_body(MAX_BODY).map(String::from_utf8) {
            Ok(Ok(text)) => body = text,
            Ok(Err(_)) => return error(req, 400, "the request body is not UTF-8"),
            Err(e) => return error(req, e.status(), e),
        }
    }
    // Modules and clones.
    if let Some(route) = modules::Route::parse(method, &path) {
        let building: Vec<String> = (shared.builds.list().into_iter())
            .filter(|b| b.status == build::Status::Running)
            .map(|b| b.module)
            .collect();
        return match shared.modules.handle(route, &building) {
            Ok(v) => respond_json(req, 200, &v),
            Err(e) => error(req, e.status(), e),
        };
    }
    let name = query(&url, "name");
    let result: Result<Value, (u16, String)> = match (method, path.as_str()) {
        ("GET", "/api/manifests") => store
            .list()
            .map(|names| json!({ "dir": store.dir().display().to_string(), "names": names }))
            .map_err(store_status),
        ("GET", "/api/manifest") => with_name(name).and_then(|n| {
            store
                .read(&n)
                .map(|text| json!({ "name": n, "text": text }))
                .map_err(store_status)
        }),
        ("PUT", "/api/manifest") => with_name(name).and_then(|n| {
            store
                .write(&n, &body)
                .map(|()| json!({ "saved": n }))
                .map_err(store_status)
        }),
        ("POST", "/api/check") => {
            let n = name.unwrap_or_else(|| "manifest.yaml".into());
            match store.path_of(&n) {
                Ok(p) => {
                    serde_json::to_value(doc::check(&body, &p)).map_err(|e| (500, e.to_string()))
                }
                Err(e) => Err(store_status(e)),
            }
        }
        ("POST", "/api/yaml") => match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                let original = v.get("original").and_then(Value::as_str).unwrap_or("");
                match v.get("doc") {
                    Some(d) => Ok(json!({ "text": doc::to_yaml(d, original) })),
                    None => Err((400, "the request has no `doc`".into())),
                }
            }
            Err(e) => Err((400, format!("the request is not JSON: {e}"))),
        },
        // The YAML editor's schema (s11-yaml).
        ("GET", "/api/schema") => Ok(schema::get().clone()),
        ("GET", "/api/builds") => Ok(json!({ "builds": shared.builds.list() })),
        ("POST", "/api/builds") => with_name(name).and_then(|n| {
            let path = store.manifest_file(&n).map_err(store_status)?;
            match shared.builds.start(&n, &path) {
                Ok(run) => serde_json::to_value(run.snapshot()).map_err(|e| (500, e.to_string())),
                Err(e @ build::BuildStartError::Busy { .. }) => Err((409, e.to_string())),
                Err(e @ build::BuildStartError::Invalid(_)) => Err((422, e.to_string())),
                Err(e) => Err((500, e.to_string())),
            }
        }),
        (m, p) if p.starts_with("/api/builds/") => {
            let rest = &p["/api/builds/".len()..];
            let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
            let run = id
                .parse::<u64>()
                .map_err(|_| (404, format!("no build {id:?}")))
                .and_then(|id| shared.builds.get(id).map_err(action_status));
            match (m, action) {
                ("GET", "") => run.and_then(|r| {
                    serde_json::to_value(r.snapshot()).map_err(|e| (500, e.to_string()))
                }),
                ("GET", "events") => match run {
                    Ok(r) => {
                        // EventSource resends the last id it saw when it reconnects.
                        let from = req
                            .header("Last-Event-ID")
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(|v| v + 1)
                            .or_else(|| query(&url, "from").and_then(|v| v.parse().ok()))
                            .unwrap_or(0);
                        return open_stream(shared, req, r, from);
                    }
                    Err(e) => Err(e),
                },
                ("GET", "consoles") => run.map(|r| {
                    // The password goes to the page here, under the token header, never in
                    // a URL; invisible VMs are not listed at all.
                    let consoles: Vec<Value> = r
                        .consoles()
                        .into_iter()
                        .map(|c| json!({ "vm": c.vm, "password": c.password }))
                        .collect();
                    json!({ "consoles": consoles })
                }),
                ("GET", "console") => {
                    let vm = query(&url, "vm");
                    let socket = match (run, vm) {
                        (Ok(r), Some(vm)) => r.console(&vm).map_err(action_status),
                        (Err(e), _) => Err(e),
                        (_, None) => Err((400, "the `vm` query parameter is required".into())),
                    };
                    return match (socket, console::upgrade_error(&req)) {
                        (Err((status, msg)), _) => error(req, status, msg),
                        (Ok(_), Some(why)) => error(req, 400, why),
                        (Ok(c), None) => open_console(shared, req, c.socket),
                    };
                }
                ("GET", "logs") => run.map(|r| {
                    let files = r
                        .log_folder(shared.builds.output())
                        .map(|f| f.list())
                        .unwrap_or_default();
                    json!({ "files": files })
                }),
                ("GET", a) if a.starts_with("logs/") => {
                    let name = &a["logs/".len()..];
                    let opened = run.and_then(|r| {
                        r.log_folder(shared.builds.output())
                            .ok_or(build::LogFileError::NoFolder(r.id))
                            .and_then(|f| f.open(name))
                            .map_err(|e| (e.status(), e.to_string()))
                    });
                    return match opened {
                        Ok((file, len)) => {
                            let download = query(&url, "download").is_some();
                            build::send_log_file(req, file, len, name, download)
                        }
                        Err((status, msg)) => error(req, status, msg),
                    };
                }
                ("POST", "cancel") => run.and_then(|r| {
                    r.cancel()
                        .map(|()| json!({ "cancelling": r.id }))
                        .map_err(action_status)
                }),
                ("POST", "resume") => run.and_then(|r| {
                    let vm = query(&url, "vm")
                        .ok_or((400, "the `vm` query parameter is required".to_string()))?;
                    r.resume(&vm)
                        .map(|()| json!({ "resumed": vm }))
                        .map_err(action_status)
                }),
                (m, _) => Err((404, format!("no API {m} {p}"))),
            }
        }
        // A terminal in a running clone's VM (a WebSocket).
        ("GET", p) if p.starts_with("/api/clones/") && p.ends_with("/terminal") => {
            return open_terminal(shared, req, &url, p);
        }
        (m, p) => Err((404, format!("no API {m} {p}"))),
    };
    match result {
        Ok(v) => respond_json(req, 200, &v),
        Err((status, msg)) => error(req, status, msg),
    }
}

fn with_name(name: Option<String>) -> Result<String, (u16, String)> {
    name.ok_or((400, "the `name` query parameter is required".into()))
}

/// Hands an event stream a thread of its own, within [`MAX_STREAMS`].
fn open_stream(shared: &Arc<Shared>, req: Request, run: Arc<build::BuildRun>, from: u64) {
    on_stream_thread(shared, req, "serve-events", move |req| {
        sse::stream(req, run, from)
    });
}

/// Hands a console WebSocket a thread of its own, counted with the event streams.
fn open_console(shared: &Arc<Shared>, req: Request, socket: PathBuf) {
    on_stream_thread(shared, req, "serve-console", move |req| {
        console::proxy(req, &socket)
    });
}

/// Hands a terminal WebSocket (`/api/clones/C/vms/V/terminal`) a thread of its own, counted
/// with the event streams.
fn open_terminal(shared: &Arc<Shared>, req: Request, url: &str, path: &str) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["api", "clones", clone, "vms", vm, "terminal"] = parts[..] else {
        return error(req, 404, format!("no API GET {path}"));
    };
    if let Some(why) = console::upgrade_error(&req) {
        return error(req, 400, why);
    }
    let (clone, vm) = (percent_decode(clone), percent_decode(vm));
    let size = terminal::size_of(query(url, "rows"), query(url, "cols"));
    on_stream_thread(shared, req, "serve-terminal", move |req| {
        terminal::open(req, &clone, &vm, size)
    });
}

/// Runs `serve` with `req` on a thread of its own, within [`MAX_STREAMS`] such threads.
fn on_stream_thread(
    shared: &Arc<Shared>,
    req: Request,
    name: &str,
    serve: impl FnOnce(Request) + Send + 'static,
) {
    if shared.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
        shared.streams.fetch_sub(1, Ordering::SeqCst);
        return error(req, 503, "too many streams are open");
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            serve(req);
            s.streams.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        // The request moved into the failed closure and is dropped: the page reconnects.
        shared.streams.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("cannot start a {name} thread: {e}");
    }
}

fn action_status(e: build::BuildActionError) -> (u16, String) {
    let status = match e {
        build::BuildActionError::NoBuild(_) => 404,
        build::BuildActionError::Console(crate::console::ConsoleError::NotInBuild { .. }) => 404,
        build::BuildActionError::Console(_) => 409,
        build::BuildActionError::NotRunning(_) | build::BuildActionError::NotPaused(_) => 409,
        build::BuildActionError::Resume { .. } => 500,
    };
    (status, e.to_string())
}

fn store_status(e: StoreError) -> (u16, String) {
    let status = match e {
        StoreError::BadName(_) => 400,
        StoreError::Missing(_) => 404,
        StoreError::Link(_) => 403,
        StoreError::NotRegular(_) => 400,
        StoreError::TooBig { .. } => 413,
        StoreError::Io(_) => 500,
    };
    (status, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_decoding() {
        assert_eq!(
            query("/api/m?name=a%20b.yaml&x=1", "name").as_deref(),
            Some("a b.yaml")
        );
        assert_eq!(query("/api/m?x=1", "name"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
