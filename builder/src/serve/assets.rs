//! The web app, built by Vite into `builder/web/dist` (committed, so a fresh clone builds
//! without npm) and embedded in the binary. `KILN_SERVE_WEB_DIST=<dir>` serves the files of
//! that folder instead, for working on the app without rebuilding kiln.

use std::borrow::Cow;

pub struct Asset {
    pub body: Cow<'static, [u8]>,
    pub content_type: &'static str,
}

pub fn get(path: &str) -> Option<Asset> {
    let (file, body, content_type): (&str, &'static [u8], _) = match path {
        "/" | "/index.html" => (
            "index.html",
            include_bytes!("../../web/dist/index.html"),
            "text/html; charset=utf-8",
        ),
        "/app.js" => (
            "app.js",
            include_bytes!("../../web/dist/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/app.css" => (
            "app.css",
            include_bytes!("../../web/dist/app.css"),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    let body = match std::env::var_os("KILN_SERVE_WEB_DIST").filter(|d| !d.is_empty()) {
        Some(dir) => Cow::Owned(std::fs::read(std::path::Path::new(&dir).join(file)).ok()?),
        None => Cow::Borrowed(body),
    };
    Some(Asset { body, content_type })
}
