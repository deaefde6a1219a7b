//! `kiln serve`'s HTTP API on loopback: the token guard, listing, atomic saves, validation with
//! field paths, and YAML <-> JSON conversion; builds started from the page, run by a stand-in
//! `kiln` program (a real build boots a VM: the browser test does that), streamed as
//! Server-Sent Events, paused by a handbuild step and resumed, cancelled. And what an attacker
//! tries: links out of the folder, a foreign `Host` or `Origin`, a flood of idle connections.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_builder::serve::{BuildConfig, Config, Serve};

fn start(dir: &Path) -> (String, String) {
    start_with(dir, fake_build_config(dir))
}

fn fake_build_config(dir: &Path) -> BuildConfig {
    BuildConfig {
        program: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
        output: dir.join("modules"),
        run_root: dir.join("run"),
        no_cache: false,
    }
}

fn start_with(dir: &Path, build: BuildConfig) -> (String, String) {
    let s = Serve::bind(Config {
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        build,
        clones: dir.join("clones"),
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
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

fn addr_of(base: &str) -> SocketAddr {
    base.strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{base} is http://ADDR"))
}

/// Sends `request` as it is on a new connection; the answer's status and body.
fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
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
fn modules_and_clones_need_the_token_and_refuse_bad_names() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let a = agent();
    let r = a.get(format!("{base}/api/modules")).call().expect("call");
    assert_eq!(r.status(), 403);
    let r = a
        .post(format!("{base}/api/clones/web-1/start"))
        .send_empty()
        .expect("call");
    assert_eq!(r.status(), 403);
    let get = |path: &str| {
        a.get(format!("{base}{path}"))
            .header("X-Kiln-Token", &token)
            .call()
            .expect("call")
    };
    let mut r = get("/api/modules");
    assert_eq!(r.status(), 200);
    let v = json(&mut r);
    assert_eq!(v["modules"], serde_json::json!([]));
    assert!(
        v["clonesDir"]
            .as_str()
            .is_some_and(|c| c.ends_with("clones")),
        "{v}"
    );
    let mut r = get("/api/modules/nope");
    assert_eq!(r.status(), 404);
    assert!(json(&mut r)["error"]
        .as_str()
        .unwrap_or("")
        .contains("no module `nope`"));
    // A name, never a path.
    let r = get("/api/clones/..%2Fmodules");
    assert_eq!(r.status(), 400);
    let mut r = a
        .delete(format!("{base}/api/clones/web-1"))
        .header("X-Kiln-Token", &token)
        .call()
        .expect("call");
    assert_eq!(r.status(), 404);
    assert!(json(&mut r)["error"]
        .as_str()
        .unwrap_or("")
        .contains("no clone `web-1`"));
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
    // The YAML editor underlines from `column` to `end_column`: the offending value.
    let line = text.lines().nth(3).expect("line 4");
    let from = d["column"].as_u64().expect("column") as usize;
    let to = d["end_column"].as_u64().expect("end_column") as usize;
    assert_eq!(line.get(from - 1..to - 1), Some("lots"), "{d}");
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

/// A stand-in for `kiln build --json --output OUT FILE`: prints the events a real build
/// prints. A manifest naming `hang` runs until SIGINT, as a build stopped by Ctrl-C; one with
/// a handbuild step waits for the resume flag `kiln resume` writes, then writes a module.
const FAKE_KILN: &str = r#"#!/bin/sh
set -eu
out=$4; file=$5; name=$(basename "$file" .yaml)
ev() { printf '%s\n' "$1"; }
# The handler goes in before the first event: a cancel may come as soon as one is seen.
if grep -q hang "$file"; then
  trap 'echo "error: the build was cancelled; no module was written" >&2; exit 130' INT
fi
ev '{"event":"build","phase":"Pending","elapsedMs":0,"message":null}'
ev '{"event":"build","phase":"Building","elapsedMs":1,"message":null}'
ev '{"event":"vm","vm":"a","phase":"Provisioning","elapsedMs":2,"message":null}'
if grep -q hang "$file"; then
  while :; do sleep 0.1; done
fi
ev '{"event":"stepStarted","vm":"a","index":0,"step":"wait","kind":"handbuild"}'
flag="$KILN_RUN_DIR/$$/a/resume"
mkdir -p "$(dirname "$flag")"; rm -f "$flag"
ev '{"event":"note","vm":"a","message":"handbuild wait: do it"}'
i=0
while [ ! -e "$flag" ]; do sleep 0.05; i=$((i+1)); [ $i -lt 400 ] || exit 3; done
ev '{"event":"stepFinished","vm":"a","index":0,"step":"wait","ok":true,"durationMs":5,"message":null}'
ev '{"event":"stepStarted","vm":"a","index":1,"step":"say","kind":"shell"}'
ev '{"event":"stepOutput","vm":"a","step":"say","stream":"stdout","line":"hello from the guest"}'
ev '{"event":"stepFinished","vm":"a","index":1,"step":"say","ok":true,"durationMs":5,"message":null}'
ev '{"event":"vm","vm":"a","phase":"Succeeded","elapsedMs":9,"message":null}'
mkdir -p "$out/$name"
printf '{"apiVersion":"kiln/v1","kind":"Module","name":"%s","kilnVersion":"0","engine":"fake","builtAt":0,"buildSeconds":1.0,"vms":[],"manifest":""}\n' "$name" > "$out/$name/module.yaml"
ev '{"event":"build","phase":"Succeeded","elapsedMs":10,"message":null}'
"#;

const PAUSING: &str = "vms:
  - name: a
    source: { bootstrap: { distro: debian, suite: bookworm, packages: [] } }
    resources: { cpu: 1, memory: 1Gi }
    provisioners:
      - name: wait
        type: handbuild
        handbuild: { instructions: \"Install the thing by hand.\" }
      - name: say
        type: shell
        shell: { inline: \"echo hello\" }
";

fn fake_kiln(dir: &Path) -> BuildConfig {
    use std::os::unix::fs::PermissionsExt as _;
    let program = dir.join("fake-kiln");
    std::fs::write(&program, FAKE_KILN).expect("write the stand-in");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    BuildConfig {
        program,
        ..fake_build_config(dir)
    }
}

fn call(
    a: &ureq::Agent,
    method: &str,
    url: &str,
    token: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut r = match method {
        "GET" => a.get(url).header("X-Kiln-Token", token).call(),
        _ => a.post(url).header("X-Kiln-Token", token).send(body),
    }
    .expect("request");
    (r.status().as_u16(), json(&mut r))
}

fn wait_state(
    a: &ureq::Agent,
    base: &str,
    token: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (_, v) = call(a, "GET", &format!("{base}/api/builds/1"), token, "");
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads an event stream until `event: end`: `(event, id, data)` per message.
fn read_stream(url: String) -> Vec<(String, Option<u64>, String)> {
    let a = agent();
    let mut r = a.get(&url).call().expect("events");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = std::io::BufReader::new(r.body_mut().as_reader());
    let mut out = Vec::new();
    let (mut event, mut id, mut data) = (String::new(), None, String::new());
    for line in reader.lines() {
        let line = line.expect("line");
        if line.is_empty() {
            if !event.is_empty() {
                out.push((event.clone(), id, data.clone()));
                if event == "end" {
                    break;
                }
            }
            (event, id, data) = (String::new(), None, String::new());
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.into();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.into();
        }
    }
    out
}

/// A server on `d` with the stand-in `kiln`, building `PAUSING` as `m.yaml`: its base URL,
/// token, an agent, and the build's first state.
fn start_pausing_build(d: &Path) -> (String, String, ureq::Agent, serde_json::Value) {
    std::fs::write(d.join("m.yaml"), PAUSING).expect("manifest");
    let (base, token) = start_with(d, fake_kiln(d));
    let a = agent();
    let (st, v) = call(
        &a,
        "POST",
        &format!("{base}/api/builds?name=m.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 200, "{v}");
    (base, token, a, v)
}

#[test]
fn a_build_streams_pauses_at_handbuild_resumes_and_succeeds() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token, a, v) = start_pausing_build(d.path());
    assert_eq!(v["status"], "running");
    assert_eq!(v["module"], "m");
    assert_eq!(v["vms"][0]["steps"][0]["kind"], "handbuild");
    assert_eq!(v["vms"][0]["steps"][1]["status"], "pending");
    // One build at a time.
    let (st, _) = call(
        &a,
        "POST",
        &format!("{base}/api/builds?name=m.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 409);

    // The stream is open while the other requests below are served.
    let events = std::thread::spawn({
        let url = format!("{base}/api/builds/1/events?token={token}");
        move || read_stream(url)
    });
    let v = wait_state(&a, &base, &token, "the pause", |v| {
        !v["vms"][0]["paused"].is_null()
    });
    assert_eq!(
        v["vms"][0]["paused"]["instructions"],
        "Install the thing by hand."
    );
    assert_eq!(v["vms"][0]["phase"], "Provisioning");
    let (st, _) = call(&a, "GET", &format!("{base}/api/manifests"), &token, "");
    assert_eq!(st, 200, "other requests are served during a stream");
    let (st, _) = call(
        &a,
        "POST",
        &format!("{base}/api/builds/1/resume?vm=zz"),
        &token,
        "",
    );
    assert_eq!(st, 409);
    let (st, v) = call(
        &a,
        "POST",
        &format!("{base}/api/builds/1/resume?vm=a"),
        &token,
        "",
    );
    assert_eq!(st, 200, "{v}");

    let v = wait_state(&a, &base, &token, "the end", |v| v["status"] != "running");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["phase"], "Succeeded");
    assert_eq!(v["result"]["record"]["name"], "m");
    assert_eq!(v["vms"][0]["steps"][1]["status"], "ok");
    assert!(v["vms"][0]["paused"].is_null());

    let got = events.join().expect("stream thread");
    assert_eq!(got.last().map(|e| e.0.as_str()), Some("end"));
    assert_eq!(got[0].0, "state");
    let logs: Vec<_> = got.iter().filter(|e| e.0 == "log").collect();
    assert!(
        logs.iter().any(|e| e.2.contains("hello from the guest")),
        "{logs:?}"
    );
    let ids: Vec<u64> = logs.iter().filter_map(|e| e.1).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    let last_state: serde_json::Value = serde_json::from_str(
        &got.iter()
            .rev()
            .find(|e| e.0 == "state")
            .expect("a state")
            .2,
    )
    .expect("state json");
    assert_eq!(last_state["status"], "succeeded");

    // A stream opened later from an id replays only what follows it.
    let again = read_stream(format!("{base}/api/builds/1/events?token={token}&from=3"));
    let first = again.iter().find(|e| e.0 == "log").and_then(|e| e.1);
    assert_eq!(first, Some(3));
    // Streams need the token too.
    let r = agent()
        .get(format!("{base}/api/builds/1/events"))
        .call()
        .expect("call");
    assert_eq!(r.status(), 403);
}

#[test]
fn a_build_is_cancelled_and_bad_manifests_do_not_start() {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        d.path().join("hang.yaml"),
        PAUSING.replace("name: say", "name: hang"),
    )
    .expect("manifest");
    std::fs::write(d.path().join("bad.yaml"), "vms: 3\n").expect("manifest");
    let (base, token) = start_with(d.path(), fake_kiln(d.path()));
    let a = agent();
    let (st, v) = call(
        &a,
        "POST",
        &format!("{base}/api/builds?name=bad.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 422, "{v}");
    let (st, _) = call(
        &a,
        "POST",
        &format!("{base}/api/builds?name=none.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 404);
    let (st, v) = call(
        &a,
        "POST",
        &format!("{base}/api/builds?name=hang.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 200, "{v}");
    wait_state(&a, &base, &token, "provisioning", |v| {
        v["vms"][0]["phase"] == "Provisioning"
    });
    let (st, v) = call(
        &a,
        "POST",
        &format!("{base}/api/builds/1/cancel"),
        &token,
        "",
    );
    assert_eq!(st, 200, "{v}");
    let v = wait_state(&a, &base, &token, "the end", |v| v["status"] != "running");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["phase"], "Failed");
    assert!(
        v["error"].as_str().unwrap_or("").contains("cancelled"),
        "{v}"
    );
    let (st, _) = call(
        &a,
        "POST",
        &format!("{base}/api/builds/1/cancel"),
        &token,
        "",
    );
    assert_eq!(st, 409, "an ended build cannot be cancelled");
    let (_, v) = call(&a, "GET", &format!("{base}/api/builds"), &token, "");
    assert_eq!(v["builds"].as_array().map(Vec::len), Some(1));
}

#[test]
fn links_out_of_the_folder_and_fifos_are_refused() {
    use std::os::unix::fs::symlink;
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("edit");
    std::fs::create_dir(&dir).expect("mkdir");
    let secret = d.path().join("secret.yaml");
    std::fs::write(&secret, "password: hunter2\n").expect("outside file");
    symlink(&secret, dir.join("abs.yaml")).expect("link");
    symlink("../secret.yaml", dir.join("rel.yaml")).expect("link");
    let (base, token) = start_with(&dir, fake_kiln(d.path()));
    let a = agent();
    for name in ["abs.yaml", "rel.yaml"] {
        let url = format!("{base}/api/manifest?name={name}");
        let mut r = a
            .get(&url)
            .header("X-Kiln-Token", &token)
            .call()
            .expect("get");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().expect("body");
        assert_eq!(status, 403, "{name}: {text}");
        assert!(!text.contains("hunter2"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert!(
            v["error"].as_str().unwrap_or("").contains("symbolic link"),
            "{v}"
        );

        let r = a
            .put(&url)
            .header("X-Kiln-Token", &token)
            .send("vms: []\n")
            .expect("put");
        assert_eq!(r.status(), 403, "{name}");
        assert_eq!(
            std::fs::read_to_string(&secret).expect("outside file"),
            "password: hunter2\n"
        );
        assert!(std::fs::symlink_metadata(dir.join(name))
            .expect("the link")
            .file_type()
            .is_symlink());

        let (st, v) = call(
            &a,
            "POST",
            &format!("{base}/api/builds?name={name}"),
            &token,
            "",
        );
        assert_eq!(st, 403, "{v}");
    }
    let (_, v) = call(&a, "GET", &format!("{base}/api/manifests"), &token, "");
    assert_eq!(v["names"], serde_json::json!([]));

    // A FIFO would block a reader until something writes to it.
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("pipe.yaml"))
        .status();
    if !made.is_ok_and(|s| s.success()) {
        println!("SKIP: the FIFO part: mkfifo failed");
        return;
    }
    let started = Instant::now();
    let (st, v) = call(
        &a,
        "GET",
        &format!("{base}/api/manifest?name=pipe.yaml"),
        &token,
        "",
    );
    assert_eq!(st, 400, "{v}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_foreign_host_or_origin_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let addr = addr_of(&base);
    let port = addr.port();
    let req = |method: &str, host: &str, origin: &str, body: &str| {
        let host = if host.is_empty() {
            String::new()
        } else {
            format!("Host: {host}\r\n")
        };
        let origin = if origin.is_empty() {
            String::new()
        } else {
            format!("Origin: {origin}\r\n")
        };
        raw(
            addr,
            &format!(
                "{method} /api/manifest?name=m.yaml HTTP/1.1\r\n{host}{origin}\
                 X-Kiln-Token: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let own = format!("http://{addr}");
    for (host, origin) in [
        (addr.to_string(), String::new()),
        (format!("localhost:{port}"), String::new()),
        (addr.to_string(), own.clone()),
        (
            format!("localhost:{port}"),
            format!("http://localhost:{port}"),
        ),
    ] {
        let (st, body) = req("PUT", &host, &origin, "vms: []\n");
        assert_eq!(st, 200, "Host {host}, Origin {origin:?}: {body}");
    }
    for (host, origin, what) in [
        (format!("rebind.example:{port}"), String::new(), "Host"),
        (
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            String::new(),
            "Host",
        ),
        (String::new(), String::new(), "Host"),
        (addr.to_string(), "http://evil.example".into(), "refused"),
        (addr.to_string(), "null".into(), "refused"),
        (addr.to_string(), format!("https://{addr}"), "refused"),
    ] {
        let (st, body) = req("PUT", &host, &origin, "stolen: 1\n");
        assert_eq!(st, 403, "Host {host:?}, Origin {origin:?}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert!(v["error"].as_str().unwrap_or("").contains(what), "{v}");
        let (st, body) = req("GET", &host, &origin, "");
        assert_eq!(st, 403, "{body}");
    }
    assert_eq!(
        std::fs::read_to_string(d.path().join("m.yaml")).expect("saved"),
        "vms: []\n"
    );
}

/// A `kiln serve` process, killed when dropped.
struct ServeProcess(std::process::Child);

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Threads line")
}

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd folder")
        .count()
}

#[test]
fn idle_connections_are_bounded_and_timed_out() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg(d.path())
        .args(["--listen", "127.0.0.1:0", "--output"])
        .arg(d.path().join("modules"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start kiln serve");
    let stdout = child.stdout.take().expect("stdout");
    let server = ServeProcess(child);
    let pid = server.0.id();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the URL line");
    let url = line
        .trim()
        .strip_prefix("kiln serve: ")
        .unwrap_or_else(|| panic!("{line:?}"));
    let (base, token) = url.split_once("/?token=").expect("url has a token");
    let addr = addr_of(base);
    let good = format!(
        "GET /api/manifests HTTP/1.1\r\nHost: {addr}\r\nX-Kiln-Token: {token}\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(raw(addr, &good).0, 200);
    let threads_before = proc_threads(pid);

    // 1,000 connections that never send a byte.
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "connecting is stuck"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let (threads, fds) = (proc_threads(pid), proc_fds(pid));
    assert!(
        threads <= threads_before + 2,
        "1000 idle connections: {threads} threads (before: {threads_before})"
    );
    assert!(fds < 150, "1000 idle connections: {fds} open descriptors");
    // A real request still gets through at once.
    let t = Instant::now();
    let (st, body) = raw(addr, &good);
    assert_eq!(st, 200, "{body}");
    // Well before the idle ones time out (5 s): they do not stand in its way.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(idle);

    // Half a head is given up on within a few seconds.
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /api/manifests HTTP/1.1\r\nHost: ")
        .expect("send");
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let t = Instant::now();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a half-sent head held its connection for {:?}",
        t.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(proc_threads(pid) <= threads_before + 2);
}

#[test]
fn heads_and_bodies_are_limited() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let addr = addr_of(&base);
    let head = |extra: &str| {
        format!(
            "PUT /api/manifest?name=m.yaml HTTP/1.1\r\nHost: {addr}\r\nX-Kiln-Token: {token}\r\n\
             {extra}Connection: close\r\n\r\n"
        )
    };
    // A head over the limit.
    let big = format!("X-Pad: {}\r\n", "a".repeat(20 << 10));
    assert_eq!(raw(addr, &head(&big)).0, 431);
    // Chunked bodies are not taken.
    let (st, body) = raw(addr, &head("Transfer-Encoding: chunked\r\n"));
    assert_eq!(st, 501, "{body}");
    // A body over the limit is refused from its Content-Length.
    let (st, body) = raw(addr, &head("Content-Length: 999999999\r\n"));
    assert_eq!(st, 413, "{body}");
    // `Expect: 100-continue` (curl's, for bodies over 1 KiB) gets its interim answer.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(head("Expect: 100-continue\r\nContent-Length: 8\r\n").as_bytes())
        .expect("head");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"vms: []\n").expect("body");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        std::fs::read_to_string(d.path().join("m.yaml")).expect("saved"),
        "vms: []\n"
    );
}

/// A VNC server standing in for QEMU's on `socket`: sends the RFB banner, then hands back
/// the first client version it reads, so a test sees bytes cross both ways. Connections that
/// close without one (the server checking that the console answers) are passed over.
fn fake_vnc(socket: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let l = std::os::unix::net::UnixListener::bind(socket).expect("bind the VNC socket");
    std::thread::spawn(move || loop {
        let (mut s, _) = l.accept().expect("accept");
        let _ = s.write_all(b"RFB 003.008\n");
        let mut got = vec![0u8; 12];
        if s.read_exact(&mut got).is_ok() {
            return got;
        }
    })
}

#[test]
fn a_running_vm_console_is_a_websocket_to_its_vnc_socket() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token, a, _) = start_pausing_build(d.path());
    wait_state(&a, &base, &token, "the pause", |v| {
        !v["vms"][0]["paused"].is_null()
    });
    let consoles = || {
        call(
            &a,
            "GET",
            &format!("{base}/api/builds/1/consoles"),
            &token,
            "",
        )
    };
    // No screen yet: no console listed, and the route says why.
    let (st, v) = consoles();
    assert_eq!(
        (st, v["consoles"].clone()),
        (200, serde_json::json!([])),
        "{v}"
    );
    let addr = addr_of(&base);
    let upgrade = |path: &str, extra: &str| {
        raw(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
            ),
        )
    };
    let path = format!("/api/builds/1/console?vm=a&token={token}");
    let (st, body) = upgrade(&path, "");
    assert!(
        st == 409 && (body.contains("no screen") || body.contains("not started")),
        "{st} {body}"
    );

    // The build's VM gets a screen: what the qemu engine makes in the VM's runtime folder.
    let run = d.path().join("run");
    let start = Instant::now();
    let vm_dir = loop {
        let found = std::fs::read_dir(&run)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("a"))
            .find(|p| p.is_dir());
        match found {
            Some(d) => break d,
            None if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => panic!("the stand-in made no VM folder in {}", run.display()),
        }
    };
    std::fs::write(vm_dir.join("vnc.pass"), "pAss2345").expect("password");
    let server = fake_vnc(&vm_dir.join("vnc.sock"));
    let (st, v) = consoles();
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["consoles"],
        serde_json::json!([{"vm": "a", "password": "pAss2345"}])
    );

    // What the server's checks refuse: no token, another site's page, no upgrade, no VM.
    let (st, _) = upgrade("/api/builds/1/console?vm=a", "");
    assert_eq!(st, 403);
    let (st, _) = upgrade(&path, "Origin: http://evil.example\r\n");
    assert_eq!(st, 403);
    let (st, body) = raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    );
    assert!(st == 400 && body.contains("WebSocket"), "{st} {body}");
    let (st, _) = upgrade(&format!("/api/builds/1/console?vm=zz&token={token}"), "");
    assert_eq!(st, 404);

    // The page's own origin gets through, and bytes cross both ways as binary messages.
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}{path}"))
            .expect("request");
    req.headers_mut()
        .insert("Origin", format!("http://{addr}").parse().expect("origin"));
    let (mut ws, resp) = tungstenite::client::client(req, tcp).expect("handshake");
    assert_eq!(resp.status(), 101);
    let mut got = Vec::new();
    while got.len() < 12 {
        match ws.read().expect("a message") {
            tungstenite::Message::Binary(b) => got.extend_from_slice(&b),
            m => panic!("not binary: {m:?}"),
        }
    }
    assert_eq!(got, b"RFB 003.008\n");
    // Split over two messages, as a client may send it.
    ws.send(tungstenite::Message::Binary(b"RFB 003".to_vec().into()))
        .expect("send");
    ws.send(tungstenite::Message::Binary(b".008\n".to_vec().into()))
        .expect("send");
    assert_eq!(server.join().expect("fake VNC"), b"RFB 003.008\n");
    // The VM's side closed: the WebSocket closes too.
    let end = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) => break "close",
            Ok(_) => {}
            Err(_) => break "error",
        }
    };
    assert!(matches!(end, "close" | "error"));
}

#[test]
fn the_schema_is_served_under_the_token() {
    let d = tempfile::tempdir().expect("tempdir");
    let (base, token) = start(d.path());
    let url = format!("{base}/api/schema");
    let mut r = agent()
        .get(&url)
        .header("X-Kiln-Token", &token)
        .call()
        .expect("schema");
    assert_eq!(r.status(), 200);
    assert_eq!(
        json(&mut r),
        kiln_builder::manifest::json_schema::json_schema()
    );
    assert_eq!(agent().get(&url).call().expect("call").status(), 403);
}
