//! The bridge between manifest text and the document the web form edits: YAML -> JSON
//! (through the same located tree the validator reads, so scalar types follow the same rules)
//! and JSON -> canonical YAML (through `kiln fmt`'s writer, so the form's output is the text
//! `kiln fmt` would print). Fields the form does not know are just JSON members: they pass
//! through untouched. Diagnostics get the path of the field they point at, so the form can
//! show each error on its field.

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::manifest::diag::{Pos, Span};
use crate::manifest::yaml::{self, plain_type, Kind, Node, PlainType, Style};
use crate::manifest::{fmt, Diagnostic, Severity};

/// One step of a path into the document: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A diagnostic as the web app shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WebDiagnostic {
    pub severity: Severity,
    pub line: usize,
    pub column: usize,
    /// Where the offending text ends on its line (exclusive), for the editor's underline.
    pub end_column: usize,
    pub message: String,
    pub hint: Option<String>,
    /// The field the diagnostic points at (empty: the document as a whole).
    pub path: Vec<Step>,
}

/// The answer to "validate this text": diagnostics and, when the YAML parses, the document.
#[derive(Debug, Serialize)]
pub struct Checked {
    pub diagnostics: Vec<WebDiagnostic>,
    pub doc: Option<Value>,
}

/// Validate `text` as the manifest at `path` and convert it for the form.
pub fn check(text: &str, path: &std::path::Path) -> Checked {
    let limits = crate::manifest::Limits::from_env();
    let loaded = crate::manifest::load_str(text, path, limits);
    let tree = yaml::parse(text, limits.yaml).ok();
    let mut index = Vec::new();
    if let Some(root) = &tree {
        locate(root, &mut Vec::new(), &mut index);
        index.sort_by_key(|(p, _)| *p);
    }
    let diagnostics = loaded
        .diagnostics
        .iter()
        .map(|d| web_diagnostic(d, &index))
        .collect();
    Checked {
        diagnostics,
        doc: tree.as_ref().map(to_json),
    }
}

fn web_diagnostic(d: &Diagnostic, index: &[(Pos, Vec<Step>)]) -> WebDiagnostic {
    let at = Pos {
        line: d.line,
        col: d.column,
    };
    // The last node starting at or before the diagnostic's place holds it (nodes are listed
    // in document order, keys standing for their values).
    let i = index.partition_point(|(p, _)| *p <= at);
    let path = if i == 0 {
        Vec::new()
    } else {
        index[i - 1].1.clone()
    };
    WebDiagnostic {
        severity: d.severity,
        line: d.line,
        column: d.column,
        end_column: d.end_column,
        message: d.message.clone(),
        hint: d.hint.clone(),
        path,
    }
}

/// Every node's start with its path; a map key's start maps to the path of its value.
fn locate(node: &Node, path: &mut Vec<Step>, out: &mut Vec<(Pos, Vec<Step>)>) {
    out.push((node.span.start, path.clone()));
    match &node.kind {
        Kind::Map(entries) => {
            for (k, v) in entries {
                path.push(Step::Key(key_text(k)));
                out.push((k.span.start, path.clone()));
                locate(v, path, out);
                path.pop();
            }
        }
        Kind::Seq(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Step::Index(i));
                locate(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn key_text(k: &Node) -> String {
    match &k.kind {
        Kind::Scalar(s, _) => s.clone(),
        Kind::Null => String::new(),
        // Complex keys are rejected by the validator; name them by their shape.
        _ => k.describe().to_string(),
    }
}

/// The located tree as JSON. Plain scalars take YAML 1.2 core types (as the validator reads
/// them); quoted and block scalars are strings. Values JSON cannot hold (`.inf`, integers
/// beyond 64 bits) stay strings: the validator rejects them in every manifest field anyway.
pub fn to_json(node: &Node) -> Value {
    match &node.kind {
        Kind::Null => Value::Null,
        Kind::Scalar(s, Style::Plain) => match plain_type(s) {
            PlainType::Null => Value::Null,
            PlainType::Bool(b) => Value::Bool(b),
            PlainType::Int(i) => i64::try_from(i)
                .map(Number::from)
                .ok()
                .or_else(|| u64::try_from(i).ok().map(Number::from))
                .map_or_else(|| Value::String(s.clone()), Value::Number),
            PlainType::Float => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map_or_else(|| Value::String(s.clone()), Value::Number),
            PlainType::Str => Value::String(s.clone()),
        },
        Kind::Scalar(s, _) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        Kind::Map(entries) => {
            let mut m = Map::new();
            for (k, v) in entries {
                m.insert(key_text(k), to_json(v));
            }
            Value::Object(m)
        }
    }
}

/// A JSON document as a located tree (with empty places), for the formatter.
pub fn from_json(v: &Value) -> Node {
    let kind = match v {
        Value::Null => Kind::Null,
        Value::Bool(b) => Kind::Scalar(b.to_string(), Style::Plain),
        Value::Number(n) => Kind::Scalar(n.to_string(), Style::Plain),
        // Quoted: the formatter writes it plain when that reads back as the same string.
        Value::String(s) => Kind::Scalar(s.clone(), Style::Quoted),
        Value::Array(items) => Kind::Seq(items.iter().map(from_json).collect()),
        Value::Object(m) => Kind::Map(
            m.iter()
                .map(|(k, v)| {
                    let key = Node {
                        span: Span::default(),
                        kind: Kind::Scalar(k.clone(), Style::Quoted),
                    };
                    (key, from_json(v))
                })
                .collect(),
        ),
    };
    Node {
        span: Span::default(),
        kind,
    }
}

/// The canonical YAML of a document. `original` (the text the document was read from, if
/// any) supplies the comments, which stay with their entries as `kiln fmt` keeps them.
pub fn to_yaml(v: &Value, original: &str) -> String {
    fmt::format(&from_json(v), original)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> (Value, Value) {
        let a = to_json(&yaml::parse(text, Default::default()).expect("parses"));
        let out = to_yaml(&a, text);
        let b = to_json(&yaml::parse(&out, Default::default()).expect("output parses"));
        (a, b)
    }

    #[test]
    fn scalar_types_survive() {
        let (a, b) =
            roundtrip("a: 2\nb: \"2\"\nc: true\nd: 'true'\ne: 1.5\ng: 30m\nh: |\n  x\n  y\n");
        assert_eq!(a, b);
        assert_eq!(a["a"], Value::from(2));
        assert_eq!(a["b"], Value::from("2"));
        assert_eq!(a["d"], Value::from("true"));
        assert_eq!(a["h"], Value::from("x\ny\n"));
    }

    #[test]
    fn present_but_empty_objects_survive() {
        // `cloudInit:` (null) means "attach a seed": the writer keeps it.
        let (a, b) = roundtrip("vms:\n  - name: a\n    cloudInit:\n    source: { blank: true }\n");
        // The writer spells it `{}`: the same meaning, and a fixed point from then on.
        assert_eq!(b["vms"][0]["cloudInit"], serde_json::json!({}));
        assert_eq!(to_yaml(&a, ""), to_yaml(&b, ""));
    }

    #[test]
    fn diagnostics_name_their_field() {
        let text = "vms:\n  - name: a\n    source: { blank: true }\n    resources: { cpu: 1, memory: lots }\n";
        let c = check(text, std::path::Path::new("m.yaml"));
        let d = c
            .diagnostics
            .iter()
            .find(|d| d.message.contains("lots") || d.line == 4)
            .expect("a diagnostic on line 4");
        assert_eq!(
            d.path,
            vec![
                Step::Key("vms".into()),
                Step::Index(0),
                Step::Key("resources".into()),
                Step::Key("memory".into())
            ]
        );
    }
}
