//! `kiln serve`'s HTTP API on loopback: the token guard, listing, atomic saves, validation with
//! field paths, and YAML <-> JSON conversion.

use std::path::Path;

use kiln_builder::serve::{Config, Serve};

fn start(dir: &Path) -> (String, String) {
    let s = Serve::bind(Config {
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
    })
    .expect("bind");
    let url = s.url();
    std::thread::spawn(move || s.run());
    let (base, token) = url.split_once("/?token=").expect("url has a token");
    (base.to_string(), token.to_string())
}

fn json(r: &mut ureq::http::Response<ureq::Body>) -> serde_json::Value {
    let text = r.body_mut().read_to_string().expect("body");
    serde_json::from_str(&text).expect("json")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

#[test]
fn requests_without_the_token_are_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let a = agent();
    let r = a.get(format!("{base}/api/manifests")).call().expect("call");
    assert_eq!(r.status(), 403);
    let r = a
        .get(format!("{base}/api/manifests"))
        .header("X-Kiln-Token", "0".repeat(token.len()))
        .call()
        .expect("call");
    assert_eq!(r.status(), 403);
    let r = a.get(format!("{base}/")).call().expect("call");
    assert_eq!(r.status(), 403);
    let mut r = a
        .get(format!("{base}/?token={token}"))
        .call()
        .expect("call");
    assert_eq!(r.status(), 200);
    let page = r.body_mut().read_to_string().expect("body");
    assert!(page.contains("app.js"), "{page}");
}

#[test]
fn save_list_read_and_check() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let a = agent();
    let text =
        "vms:\n  - name: a\n    source: { blank: true }\n    resources: { cpu: 1, memory: lots }\n";
    let r = a
        .put(format!("{base}/api/manifest?name=m.yaml"))
        .header("X-Kiln-Token", &token)
        .send(text)
        .expect("put");
    assert_eq!(r.status(), 200);
    assert_eq!(
        std::fs::read_to_string(d.path().join("m.yaml")).expect("saved"),
        text
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    let r = a
        .put(format!("{base}/api/manifest?name=..%2Fescape.yaml"))
        .header("X-Kiln-Token", &token)
        .send("x")
        .expect("put");
    assert_eq!(r.status(), 400);

    let mut r = a
        .get(format!("{base}/api/manifests"))
        .header("X-Kiln-Token", &token)
        .call()
        .expect("list");
    let v = json(&mut r);
    assert_eq!(v["names"], serde_json::json!(["m.yaml"]));

    let mut r = a
        .post(format!("{base}/api/check?name=m.yaml"))
        .header("X-Kiln-Token", &token)
        .send(text)
        .expect("check");
    let v = json(&mut r);
    let diags = v["diagnostics"].as_array().expect("diagnostics");
    let d = diags
        .iter()
        .find(|d| d["line"] == 4)
        .unwrap_or_else(|| panic!("a diagnostic on line 4: {v}"));
    assert_eq!(d["severity"], "error");
    assert_eq!(
        d["path"],
        serde_json::json!(["vms", 0, "resources", "memory"])
    );
    assert_eq!(v["doc"]["vms"][0]["resources"]["cpu"], 1);

    // The document back to YAML keeps every field, including ones no form shows.
    let mut doc = v["doc"].clone();
    doc["vms"][0]["futureField"] = serde_json::json!({"x": "2"});
    let body = serde_json::json!({ "doc": doc }).to_string();
    let mut r = a
        .post(format!("{base}/api/yaml"))
        .header("X-Kiln-Token", &token)
        .send(body)
        .expect("yaml");
    let y = json(&mut r);
    let out = y["text"].as_str().expect("text");
    assert!(
        out.contains("futureField:") && out.contains("x: \"2\""),
        "{out}"
    );
}
