//! `kiln fmt` keeps comments: a round-trip corpus (`tests/manifests/fmt/X.in.yaml` formats to
//! exactly `X.out.yaml`), the examples (already canonical), a probe comment on every line of
//! them, and the CLI (several files, folders, `-`, `--check`, `--diff`, atomic writes).
//! `KILN_BLESS=1 cargo test -p kiln-builder --test it manifest_fmt` rewrites the `.out.yaml`
//! files.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_builder::manifest::{fmt, load_str, yaml, Limits, Plan};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn comment_texts(text: &str) -> Vec<String> {
    let (_, comments) = yaml::parse_with_comments(text, Limits::default().yaml).expect("parses");
    let mut t: Vec<String> = comments.into_iter().map(|c| c.text).collect();
    t.sort();
    t
}

fn format(text: &str) -> String {
    let tree = yaml::parse(text, Limits::default().yaml).expect("parses");
    fmt::format(&tree, text)
}

fn plan(text: &str, path: &Path) -> Option<Plan> {
    load_str(text, path, Limits::default()).plan
}

/// What fmt must hold for every valid manifest: same plan, every comment kept, idempotent.
fn check(text: &str, path: &Path) -> Result<String, String> {
    let before = plan(text, path).ok_or("the input is not a valid manifest")?;
    let out = format(text);
    if plan(&out, path).as_ref() != Some(&before) {
        return Err(format!("fmt changed the plan:\n{out}"));
    }
    let (had, kept) = (comment_texts(text), comment_texts(&out));
    if had != kept {
        return Err(format!(
            "comments changed:\n  before {had:?}\n  after  {kept:?}\n{out}"
        ));
    }
    let again = format(&out);
    if again != out {
        return Err(format!(
            "not idempotent:\n{out}\n--- formatted again:\n{again}"
        ));
    }
    Ok(out)
}

fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("tests/manifests/fmt"))
        .expect("corpus directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".in.yaml"))
        .collect();
    files.sort();
    files
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("../examples"))
        .expect("examples directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn fmt_corpus_matches_expected_output() {
    let files = corpus();
    assert!(
        files.len() >= 4,
        "the fmt corpus has {} inputs",
        files.len()
    );
    let bless = std::env::var_os("KILN_BLESS").is_some();
    for input in files {
        let text = std::fs::read_to_string(&input).expect("read");
        let out = check(&text, &input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let expected_path = PathBuf::from(input.to_string_lossy().replace(".in.yaml", ".out.yaml"));
        if bless {
            std::fs::write(&expected_path, &out).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        assert_eq!(out, expected, "{}", input.display());
        // The expected output is canonical itself.
        assert_eq!(check(&expected, &expected_path).as_deref(), Ok(&*expected));
    }
}

#[test]
fn examples_are_canonical_and_keep_their_comments() {
    let files = examples();
    assert!(files.len() >= 3);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let out = check(&text, &f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(out, text, "{} is not canonical", f.display());
    }
}

/// A probe comment on its own line (at several indentations, with and without a blank line)
/// before every line, and after the value of every line: wherever it still leaves a valid
/// manifest with the same plan, fmt keeps it, once, and stays idempotent.
#[test]
fn a_comment_on_any_line_survives_fmt() {
    let mut checked = 0;
    for f in corpus().into_iter().chain(examples()) {
        let text = std::fs::read_to_string(&f).expect("read");
        let base = plan(&text, &f).expect("valid");
        let lines: Vec<&str> = text.lines().collect();
        for i in 0..=lines.len() {
            let mut variants = Vec::new();
            for indent in (0..14).step_by(2) {
                let probe = format!("{}# probe", " ".repeat(indent));
                for blank in [false, true] {
                    let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    if blank {
                        l.insert(i, String::new());
                    }
                    l.insert(i, probe.clone());
                    variants.push(l.join("\n") + "\n");
                }
            }
            if let Some(line) = lines.get(i).filter(|l| !l.trim().is_empty()) {
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l[i] = format!("{line} # probe");
                variants.push(l.join("\n") + "\n");
            }
            for v in variants {
                // A probe inside a block scalar is text, not a comment: that changes the plan.
                if plan(&v, &f).as_ref() != Some(&base) {
                    continue;
                }
                checked += 1;
                let out = check(&v, &f).unwrap_or_else(|e| {
                    panic!("{} probe at line {}: {e}\n{v}", f.display(), i + 1)
                });
                assert_eq!(out.matches("# probe").count(), 1, "{out}");
            }
        }
    }
    assert!(checked > 1000, "only {checked} probes checked");
}

fn kiln(args: &[&str], dir: &Path, stdin: Option<&str>) -> (String, String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

const MESSY: &str = "# head\nvms: [{name: a, source: {blank: true}, isos: [{url: 'https://x.example.org/a.iso'}], resources: {memory: 1Gi, cpu: 1}}] # the VMs\n";
const TIDY: &str = "# head\nvms: # the VMs\n  - name: a\n    source:\n      blank: true\n    resources:\n      cpu: 1\n      memory: 1Gi\n    isos:\n      - url: https://x.example.org/a.iso\n";

#[test]
fn fmt_keeps_comments_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, MESSY).expect("write");
    let (_, err, code) = kiln(&["fmt", "m.yaml"], dir.path(), None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), TIDY);
}

#[test]
fn fmt_takes_several_files_and_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("sub/deeper")).expect("mkdir");
    std::fs::create_dir_all(d.join(".hidden")).expect("mkdir");
    for f in ["a.yaml", "sub/b.yml", "sub/deeper/c.yaml", ".hidden/d.yaml"] {
        std::fs::write(d.join(f), MESSY).expect("write");
    }
    std::fs::write(d.join("sub/notes.txt"), "not yaml\n").expect("write");
    std::fs::write(d.join("one.yaml"), MESSY).expect("write");
    let (_, err, code) = kiln(&["fmt", "--check", "one.yaml", "sub", "a.yaml"], d, None);
    assert_eq!(code, 1, "{err}");
    for f in ["one.yaml", "sub/b.yml", "sub/deeper/c.yaml", "a.yaml"] {
        assert!(err.contains(f), "--check names {f}: {err}");
    }
    assert!(!err.contains("d.yaml"), "{err}");
    // --check changes nothing.
    assert_eq!(
        std::fs::read_to_string(d.join("a.yaml")).expect("read"),
        MESSY
    );

    let (_, err, code) = kiln(&["fmt", "one.yaml", "sub"], d, None);
    assert_eq!(code, 0, "{err}");
    for f in ["one.yaml", "sub/b.yml", "sub/deeper/c.yaml"] {
        assert_eq!(
            std::fs::read_to_string(d.join(f)).expect("read"),
            TIDY,
            "{f}"
        );
    }
    // Hidden folders are not entered; files not named are not touched.
    assert_eq!(
        std::fs::read_to_string(d.join(".hidden/d.yaml")).expect("read"),
        MESSY
    );
    assert_eq!(
        std::fs::read_to_string(d.join("a.yaml")).expect("read"),
        MESSY
    );
    let (_, err, code) = kiln(&["fmt", "--check", "."], d, None);
    assert_eq!(code, 1, "a.yaml is still messy: {err}");
    assert!(err.contains("a.yaml") && !err.contains("one.yaml"), "{err}");

    let empty = d.join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let (_, err, code) = kiln(&["fmt", "empty"], d, None);
    assert_eq!(code, 2, "a folder without manifests is an error: {err}");
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn fmt_reads_stdin_with_a_dash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err, code) = kiln(&["fmt", "-"], dir.path(), Some(MESSY));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, TIDY);
    let (out, err, code) = kiln(&["fmt", "--check", "-"], dir.path(), Some(MESSY));
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("<stdin>"), "{err}");
    let (_, _, code) = kiln(&["fmt", "--check", "-"], dir.path(), Some(TIDY));
    assert_eq!(code, 0);
    let (_, err, code) = kiln(&["fmt", "-"], dir.path(), Some("vms: [{nmae: a}]\n"));
    assert_eq!(code, 1);
    assert!(err.contains("<stdin>:1:"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

#[test]
fn fmt_diff_shows_what_would_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.yaml");
    std::fs::write(
        &file,
        "vms:\n  - source: {blank: true} # blank\n    name: a\n    resources: {cpu: 1, memory: 1Gi}\n",
    )
    .expect("write");
    let (out, err, code) = kiln(&["fmt", "--diff", "m.yaml"], dir.path(), None);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.starts_with("--- m.yaml\n+++ m.yaml (formatted)\n@@ "),
        "{out}"
    );
    assert!(
        out.contains("\n-  - source: {blank: true} # blank\n"),
        "{out}"
    );
    assert!(out.contains("\n+  - name: a\n"), "{out}");
    assert!(out.contains("\n+    source: # blank\n"), "{out}");
    // Nothing is written.
    assert!(std::fs::read_to_string(&file)
        .expect("read")
        .contains("{blank: true}"));
    let (_, _, code) = kiln(&["fmt", "m.yaml"], dir.path(), None);
    assert_eq!(code, 0);
    let (out, _, code) = kiln(&["fmt", "--diff", "m.yaml"], dir.path(), None);
    assert_eq!((out.as_str(), code), ("", 0));
}

#[test]
fn fmt_writes_atomically_and_keeps_the_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, MESSY).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (_, err, code) = kiln(&["fmt", "m.yaml"], dir.path(), None);
    assert_eq!(code, 0, "{err}");
    let meta = std::fs::metadata(&file).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    // Only the manifest is left: the temporary file was renamed over it.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    // A symlink stays a symlink: its target is formatted.
    let target = dir.path().join("target.yaml");
    std::fs::write(&target, MESSY).expect("write");
    let link = dir.path().join("link.yaml");
    std::os::unix::fs::symlink("target.yaml", &link).expect("symlink");
    let (_, err, code) = kiln(&["fmt", "link.yaml"], dir.path(), None);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).expect("read"), TIDY);
}
