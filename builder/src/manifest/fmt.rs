//! `kiln fmt`: canonical YAML. Keys follow the schema's order, collections are block style with
//! two-space indentation, multi-line strings become literal blocks, and every scalar keeps its
//! type (a plain `2` stays plain, a quoted `"2"` stays quoted), so formatting never changes
//! what the manifest means. Comments stay with the entry or item they were written above or
//! beside, and move with it when keys are reordered (see [`comments`]); a comment fmt cannot
//! place is written at the end rather than dropped.

mod comments;

use super::check::is_envelope;
use super::schema::{self, Obj, Ty};
use super::yaml::{plain_type, Kind, Node, PlainType, Style};
use comments::{item_segs, key_seg, Comments, Line, Path};

/// The canonical text of a document. `original` is the text it was read from (or the text an
/// edited document came from): it supplies the comments.
pub fn format(root: &Node, original: &str) -> String {
    let mut w = Writer {
        out: String::new(),
        comments: Comments::from_source(original),
        path: Vec::new(),
    };
    let head = w.comments.take_head();
    w.comment_block(head, 0);
    let top: &Obj = if is_envelope(root) {
        &schema::ENVELOPE
    } else {
        &schema::SPEC
    };
    match &root.kind {
        Kind::Map(_) => w.map(root, Some(top), 0),
        _ => {
            value_inline(&mut w.out, root);
            w.out.push('\n');
        }
    }
    let rest = w.comments.take_rest();
    w.comment_block(rest, 0);
    w.out
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

/// Does a mapping have an entry fmt writes (a null optional field is left out)? One without
/// is written `{}` on its key's line.
fn writes_entries(node: &Node, obj: Option<&Obj>) -> bool {
    node.as_map().unwrap_or(&[]).iter().any(|(k, v)| {
        !matches!(v.kind, Kind::Null)
            || matches!(k.as_str().and_then(|k| field_ty(obj, k)), Some(Ty::Obj(_)))
    })
}

/// Is a list item or mapping value written on one line although it has entries inside (a
/// nested list in flow style, a mapping of absent fields as `{}`)?
fn one_line(node: &Node, obj: Option<&Obj>) -> bool {
    match &node.kind {
        Kind::Seq(s) => !s.is_empty(),
        Kind::Map(m) => !m.is_empty() && !writes_entries(node, obj),
        _ => false,
    }
}

/// Right comments past the first (a line holds one) become lines above.
fn split_right(mut right: Vec<Line>) -> (Option<String>, Vec<Line>) {
    if right.is_empty() {
        return (None, right);
    }
    let rest = right.split_off(1);
    match right.pop() {
        Some(Line::Comment { text, .. }) => (Some(text), rest),
        _ => (None, rest),
    }
}

struct Writer {
    out: String,
    comments: Comments,
    /// The path of the entry or item being written.
    path: Path,
}

impl Writer {
    /// Write comment lines so they stand on their own lines just above the current one: at
    /// `indent`, or when the current line already holds a `- ` (a list item whose first key
    /// is being written), above that line at the dash's indentation.
    fn comment_block(&mut self, lines: Vec<Line>, indent: usize) {
        if !lines.iter().any(|l| matches!(l, Line::Comment { .. })) {
            return;
        }
        let at = self.out.rfind('\n').map_or(0, |i| i + 1);
        let current = &self.out[at..];
        let indent = if current.is_empty() {
            indent
        } else {
            current.len() - current.trim_start_matches(' ').len()
        };
        // No blank line at the top, and never two: a blank line right after a `|+` block would
        // become part of its text, and such a block always ends with one.
        let mut blank = at == 0 || self.out[..at].ends_with("\n\n");
        let mut block = String::new();
        for l in lines {
            match l {
                Line::Blank if !blank => {
                    block.push('\n');
                    blank = true;
                }
                Line::Blank => {}
                Line::Comment { text, .. } => {
                    block.push_str(&" ".repeat(indent));
                    block.push('#');
                    block.push_str(&text);
                    block.push('\n');
                    blank = false;
                }
            }
        }
        self.out.insert_str(at, &block);
    }

    /// Put a comment at the end of the first line written since `start`.
    fn right_comment(&mut self, start: usize, text: Option<String>) {
        let Some(text) = text else { return };
        let eol = self.out[start..]
            .find('\n')
            .map_or(self.out.len(), |i| start + i);
        self.out.insert_str(eol, &format!(" #{text}"));
    }

    /// Block mapping entries at `indent`, the first one starting where the cursor is.
    fn map(&mut self, node: &Node, obj: Option<&Obj>, indent: usize) {
        let entries = ordered(node, obj);
        let mut first = true;
        // Comments of entries not written (a null optional field means "absent").
        let mut orphans: Vec<Line> = Vec::new();
        for (k, v) in entries {
            let ty = k.as_str().and_then(|k| field_ty(obj, k));
            self.path.push(key_seg(k));
            // A null optional scalar means "absent"; a null object (`cloudInit:`) means present.
            if matches!(v.kind, Kind::Null) && !matches!(ty, Some(Ty::Obj(_))) {
                orphans.append(&mut self.comments.take_all(&self.path));
                self.path.pop();
                continue;
            }
            let mut lead = std::mem::take(&mut orphans);
            lead.append(&mut self.comments.take_leading(&self.path));
            let (right, mut more) = split_right(self.comments.take_right(&self.path));
            lead.append(&mut more);
            if matches!(v.kind, Kind::Map(_)) && one_line(v, obj_of(ty)) {
                lead.append(&mut self.comments.take_inside(&self.path));
            }
            self.comment_block(lead, indent);
            if !first {
                self.out.push_str(&" ".repeat(indent));
            }
            first = false;
            let start = self.out.len();
            scalar_key(&mut self.out, k);
            if matches!(v.kind, Kind::Null) {
                self.out.push_str(": {}\n");
            } else {
                self.out.push(':');
                self.value_after_key(v, ty, indent);
            }
            self.right_comment(start, right);
            self.path.pop();
        }
        if first {
            self.out.push_str("{}\n");
        }
        orphans.append(&mut self.comments.take_end(&self.path));
        self.comment_block(orphans, indent);
    }

    fn value_after_key(&mut self, v: &Node, ty: Option<&Ty>, indent: usize) {
        match &v.kind {
            Kind::Map(_) if writes_entries(v, obj_of(ty)) => {
                self.out.push('\n');
                self.out.push_str(&" ".repeat(indent + 2));
                self.map(v, obj_of(ty), indent + 2);
            }
            Kind::Seq(s) if !s.is_empty() => {
                self.out.push('\n');
                self.seq(v, item_ty(ty), indent + 2);
            }
            Kind::Map(_) => self.out.push_str(" {}\n"),
            _ => {
                self.out.push(' ');
                value_inline_at(&mut self.out, v, indent + 2);
                self.out.push('\n');
            }
        }
    }

    /// A block sequence with its `- ` at `indent`.
    fn seq(&mut self, node: &Node, ty: Option<&Ty>, indent: usize) {
        let items = node.as_seq().unwrap_or(&[]);
        for (item, seg) in items.iter().zip(item_segs(items)) {
            self.path.push(seg);
            let mut lead = self.comments.take_leading(&self.path);
            let right = self.comments.take_right(&self.path);
            let (right, mut more) = match &item.kind {
                // The item's first line is its first key's: a comment there goes above.
                Kind::Map(_) if writes_entries(item, obj_of(ty)) => (None, right),
                _ => split_right(right),
            };
            lead.append(&mut more);
            if one_line(item, obj_of(ty)) {
                // Written on one line (below): its inner comments go above it.
                lead.append(&mut self.comments.take_inside(&self.path));
            }
            self.comment_block(lead, indent);
            let start = self.out.len();
            self.out.push_str(&" ".repeat(indent));
            self.out.push_str("- ");
            match &item.kind {
                Kind::Map(_) if writes_entries(item, obj_of(ty)) => {
                    self.map(item, obj_of(ty), indent + 2)
                }
                Kind::Seq(s) if !s.is_empty() => {
                    // Nested lists are rare in manifests; flow style keeps them on one line.
                    value_inline(&mut self.out, item);
                    self.out.push('\n');
                }
                Kind::Map(_) => self.out.push_str("{}\n"),
                _ => {
                    value_inline_at(&mut self.out, item, indent + 2);
                    self.out.push('\n');
                }
            }
            self.right_comment(start, right);
            self.path.pop();
        }
        let end = self.comments.take_end(&self.path);
        self.comment_block(end, indent);
    }
}

fn scalar_key(out: &mut String, k: &Node) {
    match &k.kind {
        Kind::Scalar(s, style) => scalar(out, s, *style, usize::MAX),
        _ => out.push_str("\"\""),
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

    #[test]
    fn comments_move_with_their_keys() {
        let src = "vms:\n  - resources: # sizes\n      memory: 1Gi\n      # one is enough\n      cpu: 1\n    # the VM's name\n    name: a # short\n";
        let (_, f) = round(src);
        assert_eq!(
            f,
            "vms:\n  # the VM's name\n  - name: a # short\n    resources: # sizes\n      # one is enough\n      cpu: 1\n      memory: 1Gi\n"
        );
        assert_eq!(round(&f).1, f);
    }

    #[test]
    fn comments_of_absent_fields_are_kept() {
        // A null optional field is not written; its comments go to the next entry or the end.
        let src = "vms:\n  - name: a\n    # why no timeout\n    stepTimeout: # none\n    cpu: 1\n    retries:\n    # last\n";
        let (_, f) = round(src);
        assert_eq!(
            f,
            "vms:\n  - name: a\n    # why no timeout\n    # none\n    cpu: 1\n    # last\n"
        );
        assert_eq!(round(&f).1, f);
    }

    #[test]
    fn a_mapping_of_absent_fields_is_empty_and_keeps_its_comments() {
        // Before, this gave `efiFirmware:` and `{}` on the next line, which formats differently
        // again, and lost the comment.
        let src = "vms:\n  - name: a\n    efiFirmware:\n      secureBoot: # later\n    cpu: 1\n";
        let (_, f) = round(src);
        assert_eq!(
            f,
            "vms:\n  - name: a\n    # later\n    efiFirmware: {}\n    cpu: 1\n"
        );
        assert_eq!(round(&f).1, f);
    }

    #[test]
    fn comments_follow_named_items_of_an_edited_document() {
        // The editor formats a document whose items changed since `original` was read: a
        // comment stays with its named item, and one whose item is gone is kept at the end.
        let original = "# top\nvms:\n  # first\n  - name: a\n  # second\n  - name: b # bee\n";
        let edited = parse("vms:\n  - name: b\n", Limits::default()).unwrap();
        assert_eq!(
            format(&edited, original),
            "# top\nvms:\n  # second\n  - name: b # bee\n# first\n"
        );
    }

    #[test]
    fn text_that_does_not_parse_gives_its_header() {
        let tree = parse("vms: []\n", Limits::default()).unwrap();
        assert_eq!(
            format(&tree, "# kept\nvms: [\n# lost\n"),
            "# kept\nvms: []\n"
        );
    }

    #[test]
    fn blank_lines_between_comment_blocks_stay_single() {
        let src = "# head\n\n\n# about vms\nvms:\n  - a\n\n\n  # section\n\n  - b\n";
        let (_, f) = round(src);
        assert_eq!(
            f,
            "# head\n\n# about vms\nvms:\n  - a\n\n  # section\n\n  - b\n"
        );
        assert_eq!(round(&f).1, f);
    }

    #[test]
    fn no_blank_line_joins_a_keep_block() {
        // `|+` keeps its trailing blank lines: a blank line written after it would join it.
        let src = "a: \"x\\n\\n\"\n\n# c\nb: 1\n";
        let (n, f) = round(src);
        assert_eq!(f, "a: |+\n  x\n\n# c\nb: 1\n");
        assert_eq!(strip(&parse(&f, Limits::default()).unwrap()), strip(&n));
        assert_eq!(round(&f).1, f);
    }
}
