//! `kiln fmt`: canonical YAML. Keys follow the schema's order, collections are block style with
//! two-space indentation, multi-line strings become literal blocks, and every scalar keeps its
//! type (a plain `2` stays plain, a quoted `"2"` stays quoted), so formatting never changes
//! what the manifest means. The leading comment block of the file is kept; other comments are
//! not (the located tree does not hold them).

use super::check::is_envelope;
use super::schema::{self, Obj, Ty};
use super::yaml::{plain_type, Kind, Node, PlainType, Style};

/// The canonical text of a parsed manifest. `original` supplies the leading comments.
pub fn format(root: &Node, original: &str) -> String {
    let mut out = String::new();
    for line in original.lines() {
        let t = line.trim_start();
        if t.starts_with('#') {
            out.push_str(line.trim_end());
            out.push('\n');
        } else if t.is_empty() && !out.is_empty() {
            continue;
        } else {
            break;
        }
    }
    let top: &Obj = if is_envelope(root) {
        &schema::ENVELOPE
    } else {
        &schema::SPEC
    };
    match &root.kind {
        Kind::Map(_) => map(&mut out, root, Some(top), 0),
        _ => {
            value_inline(&mut out, root);
            out.push('\n');
        }
    }
    out
}

fn field_ty(obj: Option<&Obj>, key: &str) -> Option<&'static Ty> {
    obj.and_then(|o| o.field(key)).map(|f| &f.ty)
}

fn ordered<'n>(node: &'n Node, obj: Option<&Obj>) -> Vec<&'n (Node, Node)> {
    let entries = node.as_map().unwrap_or(&[]);
    let mut out: Vec<&(Node, Node)> = Vec::new();
    if let Some(obj) = obj {
        for f in obj.fields {
            out.extend(entries.iter().filter(|(k, _)| k.as_str() == Some(f.name)));
        }
    }
    out.extend(entries.iter().filter(|(k, _)| {
        k.as_str()
            .is_none_or(|k| obj.is_none_or(|o| o.field(k).is_none()))
    }));
    out
}

fn obj_of(ty: Option<&Ty>) -> Option<&'static Obj> {
    match ty {
        Some(Ty::Obj(o)) => Some(o),
        _ => None,
    }
}

fn item_ty(ty: Option<&Ty>) -> Option<&'static Ty> {
    match ty {
        Some(Ty::List(t)) => Some(t),
        _ => None,
    }
}

/// Block mapping entries at `indent`, the first one starting where the cursor is.
fn map(out: &mut String, node: &Node, obj: Option<&Obj>, indent: usize) {
    let entries = ordered(node, obj);
    let mut first = true;
    for (k, v) in entries {
        let ty = k.as_str().and_then(|k| field_ty(obj, k));
        // A null optional scalar means "absent"; a null object (`cloudInit:`) means present.
        if matches!(v.kind, Kind::Null) {
            if matches!(ty, Some(Ty::Obj(_))) {
                if !first {
                    out.push_str(&" ".repeat(indent));
                }
                first = false;
                scalar_key(out, k);
                out.push_str(": {}\n");
            }
            continue;
        }
        if !first {
            out.push_str(&" ".repeat(indent));
        }
        first = false;
        scalar_key(out, k);
        out.push(':');
        value_after_key(out, v, ty, indent);
    }
    if first {
        out.push_str("{}\n");
    }
}

fn scalar_key(out: &mut String, k: &Node) {
    match &k.kind {
        Kind::Scalar(s, style) => scalar(out, s, *style, usize::MAX),
        _ => out.push_str("\"\""),
    }
}

fn value_after_key(out: &mut String, v: &Node, ty: Option<&Ty>, indent: usize) {
    match &v.kind {
        Kind::Map(m) if !m.is_empty() => {
            out.push('\n');
            out.push_str(&" ".repeat(indent + 2));
            map(out, v, obj_of(ty), indent + 2);
        }
        Kind::Seq(s) if !s.is_empty() => {
            out.push('\n');
            seq(out, v, item_ty(ty), indent + 2);
        }
        _ => {
            out.push(' ');
            value_inline_at(out, v, indent + 2);
            out.push('\n');
        }
    }
}

/// A block sequence with its `- ` at `indent`.
fn seq(out: &mut String, node: &Node, ty: Option<&Ty>, indent: usize) {
    for item in node.as_seq().unwrap_or(&[]) {
        out.push_str(&" ".repeat(indent));
        out.push_str("- ");
        match &item.kind {
            Kind::Map(m) if !m.is_empty() => map(out, item, obj_of(ty), indent + 2),
            Kind::Seq(s) if !s.is_empty() => {
                // Nested lists are rare in manifests; flow style keeps them on one line.
                value_inline(out, item);
                out.push('\n');
            }
            _ => {
                value_inline_at(out, item, indent + 2);
                out.push('\n');
            }
        }
    }
}

fn value_inline(out: &mut String, v: &Node) {
    value_inline_at(out, v, usize::MAX);
}

/// A value on the current line: scalars, empty or flow collections. `indent` is the
/// indentation for literal block lines (`usize::MAX`: no block scalars allowed).
fn value_inline_at(out: &mut String, v: &Node, indent: usize) {
    match &v.kind {
        Kind::Null => out.push_str("null"),
        Kind::Scalar(s, style) => scalar(out, s, *style, indent),
        Kind::Seq(items) => {
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                value_inline(out, it);
            }
            out.push(']');
        }
        Kind::Map(entries) => {
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                scalar_key(out, k);
                out.push_str(": ");
                value_inline(out, val);
            }
            out.push('}');
        }
    }
}

fn scalar(out: &mut String, s: &str, style: Style, indent: usize) {
    if style == Style::Plain && plain_safe(s) {
        out.push_str(s);
        return;
    }
    if style != Style::Plain {
        if indent != usize::MAX && literal_ok(s) {
            literal(out, s, indent);
            return;
        }
        if plain_safe(s) && plain_type(s) == PlainType::Str {
            out.push_str(s);
            return;
        }
    }
    double_quoted(out, s);
}

/// Can `s` be written plain in block context and read back as the same text?
fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) || first.is_whitespace() {
        return false;
    }
    !s.ends_with(char::is_whitespace)
        && !s.ends_with(':')
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.contains(":\t")
        && s.chars().all(|c| !c.is_control() && c != '\u{feff}')
}

fn literal_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.trim().is_empty()
        && !s.starts_with([' ', '\t', '\n'])
        && s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control())
        && !s.contains('\u{feff}')
        && !s.contains('\u{85}')
        && !s.contains('\u{2028}')
        && !s.contains('\u{2029}')
}

fn literal(out: &mut String, s: &str, indent: usize) {
    let body = s.trim_end_matches('\n');
    let trailing = s.len() - body.len();
    out.push_str(match trailing {
        0 => "|-",
        1 => "|",
        _ => "|+",
    });
    out.push('\n');
    let pad = " ".repeat(indent);
    let mut lines: Vec<&str> = body.split('\n').collect();
    // Keep chomping: the extra trailing newlines are empty content lines.
    lines.extend(std::iter::repeat_n("", trailing.saturating_sub(1)));
    for (i, line) in lines.iter().enumerate() {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
        if i + 1 < lines.len() {
            out.push('\n');
        }
    }
}

fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || c == '\u{feff}' || c == '\u{2028}' || c == '\u{2029}' => {
                let n = c as u32;
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else {
                    out.push_str(&format!("\\u{n:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::super::yaml::{parse, Limits};
    use super::*;

    fn round(s: &str) -> (Node, String) {
        let n = parse(s, Limits::default()).unwrap();
        let f = format(&n, s);
        (n, f)
    }

    fn strip(n: &Node) -> Node {
        // Compare trees without spans.
        let kind = match &n.kind {
            Kind::Scalar(s, st) => Kind::Scalar(
                s.clone(),
                if *st == Style::Plain {
                    Style::Plain
                } else {
                    Style::Quoted
                },
            ),
            Kind::Seq(s) => Kind::Seq(s.iter().map(strip).collect()),
            Kind::Map(m) => {
                let mut v: Vec<(Node, Node)> =
                    m.iter().map(|(k, v)| (strip(k), strip(v))).collect();
                v.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
                Kind::Map(v)
            }
            Kind::Null => Kind::Null,
        };
        Node {
            span: Default::default(),
            kind,
        }
    }

    #[test]
    fn scalars_survive() {
        let src = "# head\nvms:\n  - name: a\n    x: \"2\"\n    y: 'it''s: here'\n    z: |\n      line1\n        indented\n\n      end\n    w: \"tab\\there\\u0001\"\n    v: \"keep\\n\\n\"\n    u: \"no newline\\nat end\"\n";
        let (n, f) = round(src);
        assert!(f.starts_with("# head\n"), "{f}");
        let n2 = parse(&f, Limits::default()).unwrap();
        assert_eq!(strip(&n), strip(&n2), "{f}");
        let (_, f2) = round(&f);
        assert_eq!(f, f2);
    }
}
