//! Provisioners: the block must match the type; references resolve to files.

use std::collections::BTreeMap;

use super::super::plan::{FileContent, Provisioner, ScriptSource, Shell, Step};
use super::super::yaml::{Kind, Node};
use super::{read, Cx};

const BLOCKS: &[(&str, &str)] = &[
    ("shell", "shell"),
    ("file", "file"),
    ("reboot", "reboot"),
    ("windows-update", "windowsUpdate"),
    ("handbuild", "handbuild"),
];

pub fn provisioners(cx: &mut Cx, items: &[Node], shell: Shell) -> Vec<Provisioner> {
    let mut out = Vec::new();
    for (i, p) in items.iter().enumerate() {
        let Some(ty) = read::string(p, "type") else {
            continue;
        };
        let Some((_, block)) = BLOCKS.iter().find(|(t, _)| *t == ty) else {
            continue;
        };
        let type_at = p.get("type").map_or(p.span, |t| t.span);
        for (other_ty, other_block) in BLOCKS {
            if other_block != block {
                if let Some(k) = p.key(other_block) {
                    cx.sink
                        .error(
                            k.span,
                            format!("a `{ty}` provisioner has a `{other_block}` block"),
                        )
                        .hint(format!(
                            "use `type: {other_ty}`, or move these settings into a `{block}` block"
                        ));
                }
            }
        }
        let name = read::string(p, "name").unwrap_or_else(|| format!("{ty}-{}", i + 1));
        let step_timeout = read::duration(p, "stepTimeout").unwrap_or(cx.timeout);
        if step_timeout.is_zero() {
            if let Some(at) = p.get("stepTimeout") {
                cx.sink.error(at.span, "a step timeout cannot be zero");
            }
        }
        let b = p.get(block);
        let step = match ty.as_str() {
            "shell" => shell_step(cx, b, type_at),
            "file" => file_step(cx, b, type_at, shell),
            "reboot" => Some(Step::Reboot {
                command: b
                    .and_then(|b| read::string(b, "command"))
                    .unwrap_or_else(|| {
                        if shell.is_windows() {
                            "shutdown /r /f /t 0".into()
                        } else {
                            "reboot".into()
                        }
                    }),
            }),
            "handbuild" => match b {
                Some(b) => read::string(b, "instructions")
                    .map(|instructions| Step::Handbuild { instructions }),
                None => {
                    cx.sink
                        .error(
                            type_at,
                            "a `handbuild` provisioner needs a `handbuild:` block",
                        )
                        .hint("add `handbuild: {instructions: \"...\"}`");
                    None
                }
            },
            _ => {
                cx.sink
                    .error(
                        type_at,
                        "`windows-update` provisioners are not supported by kiln yet",
                    )
                    .hint("kiln builds Linux guests today; remove this step");
                None
            }
        };
        let cache = read::boolean(p, "cache").unwrap_or(true);
        if let Some(step) = step {
            out.push(Provisioner {
                name,
                step_timeout,
                cache,
                step,
            });
        }
    }
    out
}

fn missing_block(cx: &mut Cx, at: super::super::diag::Span, ty: &str, example: &str) {
    cx.sink
        .error(at, format!("a `{ty}` provisioner needs a `{ty}:` block"))
        .hint(format!("add `{ty}: {example}`"));
}

fn shell_step(cx: &mut Cx, b: Option<&Node>, type_at: super::super::diag::Span) -> Option<Step> {
    let Some(b) = b.filter(|b| !matches!(b.kind, Kind::Null)) else {
        missing_block(cx, type_at, "shell", "{inline: \"...\"}");
        return None;
    };
    let script = match (b.key("inline"), b.key("scriptFrom")) {
        (Some(_), Some(s)) => {
            cx.sink
                .error(s.span, "a shell step has both `inline` and `scriptFrom`")
                .hint("keep one");
            return None;
        }
        (None, None) => {
            cx.sink
                .error(b.span, "a shell step needs `inline` or `scriptFrom`")
                .hint("add `inline: |` followed by the script");
            return None;
        }
        (Some(_), None) => ScriptSource::Inline(read::string(b, "inline")?),
        (None, Some(_)) => ScriptSource::Path(cx.config_ref(read::node(b, "scriptFrom")?)?),
    };
    let execute_command = read::string(b, "executeCommand");
    if let (Some(e), Some(at)) = (&execute_command, b.get("executeCommand")) {
        if !e.contains("{{ .Command }}") && !e.contains("{{.Command}}") {
            cx.sink
                .error(at.span, "`executeCommand` does not contain `{{ .Command }}`: the script would never run")
                .hint("e.g. `sudo -S sh -c '{{ .Command }}'`");
        }
    }
    let mut env = BTreeMap::new();
    match b.get("env").map(|e| &e.kind) {
        Some(Kind::Map(entries)) => {
            for (k, v) in entries {
                if let Some(k) = k.as_str() {
                    env.insert(k.to_string(), v.as_str().unwrap_or_default().to_string());
                }
            }
        }
        Some(Kind::Seq(items)) => {
            for i in items {
                if let Some((k, v)) = i.as_str().and_then(|s| s.split_once('=')) {
                    if env.insert(k.to_string(), v.to_string()).is_some() {
                        cx.sink
                            .error(i.span, format!("environment variable `{k}` is set twice"));
                    }
                }
            }
        }
        _ => {}
    }
    Some(Step::Shell {
        script,
        env,
        execute_command,
    })
}

fn file_step(
    cx: &mut Cx,
    b: Option<&Node>,
    type_at: super::super::diag::Span,
    shell: Shell,
) -> Option<Step> {
    let Some(b) = b.filter(|b| !matches!(b.kind, Kind::Null)) else {
        missing_block(cx, type_at, "file", "{fileRef: NAME, destination: /path}");
        return None;
    };
    let dest_node = b.get("destination");
    let destination = read::string(b, "destination");
    if let (Some(d), Some(at)) = (&destination, dest_node) {
        let absolute =
            d.starts_with('/') || (shell.is_windows() && d.len() > 2 && d.as_bytes()[1] == b':');
        if !absolute {
            cx.sink
                .error(
                    at.span,
                    format!("destination `{d}` is not an absolute path"),
                )
                .hint(format!("write `/{}`", d.trim_start_matches("./")));
        }
    }
    let content = match (b.get("fileRef"), b.key("source")) {
        (Some(_), Some(s)) => {
            cx.sink
                .error(s.span, "a file step has both `fileRef` and `source`")
                .hint("keep one");
            return None;
        }
        (None, None) => {
            cx.sink
                .error(b.span, "a file step needs `fileRef` or `source`")
                .hint("`fileRef` names a `files` entry");
            return None;
        }
        (Some(r), None) => {
            let names = cx.file_names();
            let name = cx.reference(r, "file", &names)?;
            cx.files.iter().find(|f| f.name == name)?.content.clone()
        }
        (None, Some(_)) => FileContent::Path(cx.config_ref(read::node(b, "source")?)?),
    };
    Some(Step::File {
        content,
        destination: destination?,
    })
}
