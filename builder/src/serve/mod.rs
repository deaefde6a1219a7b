//! `kiln serve`: the local web editor. A small HTTP server (tiny_http: synchronous, few
//! dependencies, fast to build) serves the embedded web app and a JSON API over one folder of
//! manifests. It binds to loopback unless told otherwise, and every request must carry the
//! per-run token (in the `token` query parameter or the `X-Kiln-Token` header), so other local
//! users and web pages cannot drive it.
//!
//! API (all under the token):
//! - `GET /api/manifests` -> `{dir, names}`
//! - `GET /api/manifest?name=N` -> `{name, text}`
//! - `PUT /api/manifest?name=N` (body: text) -> `{saved}`; written atomically
//! - `POST /api/check?name=N` (body: text) -> `{diagnostics: [{severity, line, column,
//!   message, hint, path}], doc}`: the validator's diagnostics, each with the path of its
//!   field, and the document as JSON (null when the YAML does not parse)
//! - `POST /api/yaml` (body: `{doc, original?}`) -> `{text}`: canonical YAML of a document

mod assets;
pub mod doc;
pub mod store;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

pub use store::{Store, StoreError};

/// Largest request body accepted: a manifest plus JSON overhead.
const MAX_BODY: u64 = 2 * crate::manifest::MAX_FILE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error("cannot make a token: {0}")]
    Token(#[source] std::io::Error),
    #[error("{0} is not a folder")]
    NotADir(PathBuf),
}

pub struct Config {
    /// The folder of manifests.
    pub dir: PathBuf,
    pub listen: SocketAddr,
}

/// A bound server, ready to run.
pub struct Serve {
    server: Server,
    store: Store,
    token: String,
    addr: SocketAddr,
}

impl Serve {
    pub fn bind(cfg: Config) -> Result<Serve, ServeError> {
        if !cfg.dir.is_dir() {
            return Err(ServeError::NotADir(cfg.dir));
        }
        let server = Server::http(cfg.listen).map_err(|e| ServeError::Bind {
            addr: cfg.listen,
            message: e.to_string(),
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| ServeError::Bind {
                addr: cfg.listen,
                message: "not an IP socket".into(),
            })?;
        Ok(Serve {
            server,
            store: Store::new(cfg.dir),
            token: new_token().map_err(ServeError::Token)?,
            addr,
        })
    }

    /// The URL to open, token included.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }

    /// Serve until the process ends.
    pub fn run(self) {
        for req in self.server.incoming_requests() {
            handle(&self.store, &self.token, req);
        }
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

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn respond(req: Request, status: u16, content_type: &str, body: Vec<u8>) {
    let mut r = Response::from_data(body).with_status_code(status);
    for (k, v) in [
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ] {
        if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            r.add_header(h);
        }
    }
    if let Err(e) = req.respond(r) {
        tracing::debug!("response not delivered: {e}");
    }
}

fn respond_json(req: Request, status: u16, v: &Value) {
    respond(req, status, "application/json", v.to_string().into_bytes());
}

fn error(req: Request, status: u16, message: impl std::fmt::Display) {
    respond_json(req, status, &json!({ "error": message.to_string() }));
}

fn handle(store: &Store, token: &str, mut req: Request) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("/").to_string();
    // The page itself may be fetched only with the token in its URL; its scripts send the
    // header. Comparing all bytes keeps the check's time independent of where it differs.
    let given = header(&req, "X-Kiln-Token").or_else(|| query(&url, "token"));
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
    let method = req.method().clone();
    if !path.starts_with("/api/") {
        return match (method, assets::get(&path)) {
            (Method::Get, Some(a)) => respond(req, 200, a.content_type, a.body.to_vec()),
            _ => error(req, 404, format!("no page {path}")),
        };
    }
    let mut body = String::new();
    if matches!(method, Method::Put | Method::Post) {
        let len = req.body_length().unwrap_or(0) as u64;
        if len > MAX_BODY {
            return error(
                req,
                413,
                format!("the request is {len} bytes: the limit is {MAX_BODY}"),
            );
        }
        let mut reader = req.as_reader().take(MAX_BODY + 1);
        if let Err(e) = reader.read_to_string(&mut body) {
            return error(req, 400, format!("cannot read the request: {e}"));
        }
        if body.len() as u64 > MAX_BODY {
            return error(req, 413, format!("the request is over {MAX_BODY} bytes"));
        }
    }
    let name = query(&url, "name");
    let result: Result<Value, (u16, String)> = match (method, path.as_str()) {
        (Method::Get, "/api/manifests") => store
            .list()
            .map(|names| json!({ "dir": store.dir().display().to_string(), "names": names }))
            .map_err(store_status),
        (Method::Get, "/api/manifest") => with_name(name).and_then(|n| {
            store
                .read(&n)
                .map(|text| json!({ "name": n, "text": text }))
                .map_err(store_status)
        }),
        (Method::Put, "/api/manifest") => with_name(name).and_then(|n| {
            store
                .write(&n, &body)
                .map(|()| json!({ "saved": n }))
                .map_err(store_status)
        }),
        (Method::Post, "/api/check") => {
            let n = name.unwrap_or_else(|| "manifest.yaml".into());
            match store.path_of(&n) {
                Ok(p) => {
                    serde_json::to_value(doc::check(&body, &p)).map_err(|e| (500, e.to_string()))
                }
                Err(e) => Err(store_status(e)),
            }
        }
        (Method::Post, "/api/yaml") => match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                let original = v.get("original").and_then(Value::as_str).unwrap_or("");
                match v.get("doc") {
                    Some(d) => Ok(json!({ "text": doc::to_yaml(d, original) })),
                    None => Err((400, "the request has no `doc`".into())),
                }
            }
            Err(e) => Err((400, format!("the request is not JSON: {e}"))),
        },
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

fn store_status(e: StoreError) -> (u16, String) {
    let status = match e {
        StoreError::BadName(_) => 400,
        StoreError::Missing(_) => 404,
        StoreError::TooBig { .. } => 413,
        StoreError::Io { .. } => 500,
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
