//! The web app, built by Vite into `builder/web/dist` (committed, so a fresh clone builds
//! without npm) and embedded in the binary.

pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
}

pub fn get(path: &str) -> Option<Asset> {
    let (body, content_type): (&'static [u8], _) = match path {
        "/" | "/index.html" => (
            include_bytes!("../../web/dist/index.html"),
            "text/html; charset=utf-8",
        ),
        "/app.js" => (
            include_bytes!("../../web/dist/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/app.css" => (
            include_bytes!("../../web/dist/app.css"),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    Some(Asset { body, content_type })
}
