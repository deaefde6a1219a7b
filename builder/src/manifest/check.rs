//! The structural check: walks the located tree against the schema tables and reports unknown
//! fields (with "did you mean"), wrong types, bad durations and quantities, enum values and
//! missing required fields. Semantic checks come later, in `lower`.

use super::diag::Sink;
use super::schema::{self, Note, Obj, Ty};
use super::suggest::closest;
use super::units;
use super::yaml::{plain_type, Kind, Node, PlainType, Style};

/// Is this top-level mapping the `kind: VirtualMachineBuild` envelope?
pub fn is_envelope(root: &Node) -> bool {
    ["kind", "spec", "apiVersion", "metadata"]
        .iter()
        .any(|k| root.get(k).is_some())
}

pub fn check_root(root: &Node, sink: &mut Sink) {
    match &root.kind {
        Kind::Null => {
            sink.error(root.span, "the manifest is empty")
                .hint("a manifest starts with `vms:`; see docs/manifest.md");
        }
        Kind::Map(_) => {
            let top = if is_envelope(root) {
                &schema::ENVELOPE
            } else {
                &schema::SPEC
            };
            check_obj(root, top, sink);
        }
        _ => {
            sink.error(
                root.span,
                format!("a manifest is a mapping, this is {}", root.describe()),
            )
            .hint("a manifest starts with `vms:`; see docs/manifest.md");
        }
    }
}

pub fn check(node: &Node, ty: &Ty, name: &str, sink: &mut Sink) {
    match ty {
        Ty::Any => {}
        Ty::Obj(obj) => match node.kind {
            Kind::Map(_) => check_obj(node, obj, sink),
            // `cloudInit:` with no value means the key is present, like `{}`.
            Kind::Null => {}
            _ => mismatch(node, &format!("a mapping ({})", obj.what), sink),
        },
        Ty::List(item) => match &node.kind {
            Kind::Seq(items) => items.iter().for_each(|i| check(i, item, name, sink)),
            _ => mismatch(node, "a list", sink),
        },
        Ty::Str => {
            if !matches!(node.kind, Kind::Scalar(..)) {
                mismatch(node, "a string", sink)
            }
        }
        Ty::Bool => match &node.kind {
            Kind::Scalar(s, Style::Plain) if matches!(plain_type(s), PlainType::Bool(_)) => {}
            Kind::Scalar(s, style) => {
                let lower = s.to_ascii_lowercase();
                let hint = if *style == Style::Quoted && matches!(plain_type(s), PlainType::Bool(_))
                {
                    "remove the quotes: a quoted value is a string".to_string()
                } else if ["yes", "no", "on", "off", "y", "n"].contains(&lower.as_str()) {
                    format!("YAML 1.2 reads `{s}` as a string: write true or false")
                } else {
                    "write true or false".to_string()
                };
                sink.error(
                    node.span,
                    format!("expected true or false, found {}", node.describe()),
                )
                .hint(hint);
            }
            _ => mismatch(node, "true or false", sink),
        },
        Ty::True => match &node.kind {
            Kind::Scalar(s, Style::Plain) if plain_type(s) == PlainType::Bool(true) => {}
            _ => {
                sink.error(
                    node.span,
                    format!("expected `true`, found {}", node.describe()),
                )
                .hint("`blank: true` asks for an empty boot disk; remove the key otherwise");
            }
        },
        Ty::Int { min, max } => match &node.kind {
            Kind::Scalar(s, Style::Plain) => match plain_type(s) {
                PlainType::Int(v) if v >= *min as i128 && v <= *max as i128 => {}
                PlainType::Int(v) => {
                    sink.error(
                        node.span,
                        format!("`{name}` {v} is out of range: expected {min} to {max}"),
                    );
                }
                _ => mismatch(node, "an integer", sink),
            },
            _ => mismatch(node, "an integer", sink),
        },
        Ty::Duration => match node.as_str() {
            Some(s) => {
                if let Err(e) = units::parse_duration(s) {
                    sink.error(node.span, format!("bad duration `{s}`: {e}"))
                        .hint("durations look like 90s, 30m, 2h or 1h30m");
                }
            }
            None => mismatch(node, "a duration such as 30m", sink),
        },
        Ty::Bytes => match node.as_str() {
            Some(s) => {
                if let Err(e) = units::parse_bytes(s) {
                    sink.error(node.span, format!("bad quantity `{s}`: {e}"))
                        .hint("sizes look like 512Mi, 4Gi or 20Gi");
                }
            }
            None => mismatch(node, "a quantity such as 4Gi", sink),
        },
        Ty::Cpu => match node.as_str() {
            Some(s) => {
                if let Err(e) = units::parse_cpus(s) {
                    sink.error(node.span, format!("bad cpu quantity `{s}`: {e}"))
                        .hint("cpu is an integer such as 2, or a quantity such as \"500m\"");
                }
            }
            None => mismatch(node, "a cpu count such as 2", sink),
        },
        Ty::Enum(values) => match node.as_str() {
            Some(s) if values.contains(&s) => {}
            Some(s) => {
                let b = sink.error(node.span, format!("unknown value `{s}`"));
                let list = values
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                match closest(s, values.iter().copied()) {
                    Some(c) => b.hint(format!("did you mean `{c}`? expected one of {list}")),
                    None => b.hint(format!("expected one of {list}")),
                };
            }
            None => mismatch(node, "a string", sink),
        },
        Ty::Env => match &node.kind {
            Kind::Map(entries) => {
                for (k, v) in entries {
                    env_name(k, k.as_str().unwrap_or(""), sink);
                    if !matches!(v.kind, Kind::Scalar(..) | Kind::Null) {
                        mismatch(v, "a string", sink);
                    }
                }
            }
            Kind::Seq(items) => {
                for i in items {
                    match i.as_str() {
                        Some(s) => match s.split_once('=') {
                            Some((name, _)) => env_name(i, name, sink),
                            None => {
                                sink.error(i.span, format!("environment entry `{s}` has no `=`"))
                                    .hint("write NAME=value, or use a mapping NAME: value");
                            }
                        },
                        None => mismatch(i, "a NAME=value string", sink),
                    }
                }
            }
            _ => mismatch(node, "a mapping of NAME: value", sink),
        },
    }
}

fn env_name(at: &Node, name: &str, sink: &mut Sink) {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        sink.error(
            at.span,
            format!("`{name}` is not a valid environment variable name"),
        )
        .hint("use letters, digits and underscores, not starting with a digit");
    }
}

fn mismatch(node: &Node, expected: &str, sink: &mut Sink) {
    sink.error(
        node.span,
        format!("expected {expected}, found {}", node.describe()),
    );
}

fn check_obj(node: &Node, obj: &Obj, sink: &mut Sink) {
    let Some(entries) = node.as_map() else {
        return;
    };
    for (i, (k, v)) in entries.iter().enumerate() {
        let Some(name) = k.as_str() else {
            sink.error(k.span, "a mapping key must be a word, not null");
            continue;
        };
        if entries[..i].iter().any(|(p, _)| p.as_str() == Some(name)) {
            sink.error(k.span, format!("duplicate key `{name}` in {}", obj.what))
                .hint("YAML keys must be unique: the second one would silently win");
            continue;
        }
        match obj.field(name) {
            Some(field) => {
                if let Note::Ignored(why) = field.note {
                    sink.warn(k.span, format!("`{name}` is ignored: {why}"));
                }
                // An optional field set to null is the same as absent.
                if matches!(v.kind, Kind::Null) && !matches!(field.ty, Ty::Obj(_) | Ty::Any) {
                    if field.required {
                        sink.error(v.span, format!("`{name}` has no value"));
                    }
                    continue;
                }
                check(v, &field.ty, field.name, sink);
            }
            // `x-` keys are extension fields (a home for YAML anchors), as in Compose files.
            None if name.starts_with("x-") => {}
            None => unknown_field(k, name, obj, sink),
        }
    }
    for field in obj.fields.iter().filter(|f| f.required) {
        if node.get(field.name).is_none() {
            let at = entries.first().map(|(k, _)| k.span).unwrap_or(node.span);
            sink.error(
                at,
                format!("{} is missing required field `{}`", obj.what, field.name),
            )
            .hint(format!("`{}`: {}", field.name, field.doc));
        }
    }
}

fn unknown_field(k: &Node, name: &str, obj: &Obj, sink: &mut Sink) {
    let b = sink.error(k.span, format!("unknown field `{name}` in {}", obj.what));
    if let Some(c) = closest(name, obj.fields.iter().map(|f| f.name)) {
        b.hint(format!("did you mean `{c}`?"));
        return;
    }
    let elsewhere: Vec<&str> = schema::ALL
        .iter()
        .filter(|o| o.field(name).is_some())
        .map(|o| o.what)
        .collect();
    if let Some(first) = elsewhere.first() {
        b.hint(format!(
            "`{name}` belongs in a {first}, not in a {}",
            obj.what
        ));
    } else {
        let known = obj
            .fields
            .iter()
            .map(|f| f.name)
            .collect::<Vec<_>>()
            .join(", ");
        b.hint(format!("{} fields are: {known}", obj.what));
    }
}
