//! A located YAML tree. serde-saphyr's event parser (granit, re-exported by serde-saphyr) feeds
//! a small tree builder that keeps the line and column of every node, so checks that run after
//! parsing (a dangling `fileRef`, overlapping CIDRs) still point at the exact text. The builder
//! enforces its own budget: nesting depth, node count (aliases count every node they copy, so an
//! alias bomb stops early) and scalar bytes. Comments are kept beside the tree (with their
//! places) for `kiln fmt`.

use serde_saphyr::granit_parser::{Event, Marker, Options, Parser, ScalarStyle, Span as GSpan};

use super::diag::{Pos, Span};

/// Limits on what one manifest may expand to. Real manifests are a few hundred nodes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    pub max_nodes: usize,
    pub max_scalar_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 48,
            max_nodes: 100_000,
            max_scalar_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Quoted,
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Scalar(String, Style),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub kind: Kind,
}

impl Node {
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Seq(s) => Some(s),
            _ => None,
        }
    }
    /// The text of a scalar of any style.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s, _) => Some(s),
            _ => None,
        }
    }
    /// A map entry by key.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
    /// A map key node by key (for pointing at the key rather than its value).
    pub fn key(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k)
    }
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            Kind::Null => "null",
            Kind::Scalar(_, Style::Plain) => match plain_type(self.as_str().unwrap_or("")) {
                PlainType::Bool(_) => "a boolean",
                PlainType::Int(_) => "an integer",
                PlainType::Float => "a number",
                PlainType::Null => "null",
                PlainType::Str => "a string",
            },
            Kind::Scalar(..) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
    fn count(&self) -> usize {
        match &self.kind {
            Kind::Seq(s) => 1 + s.iter().map(Node::count).sum::<usize>(),
            Kind::Map(m) => 1 + m.iter().map(|(k, v)| k.count() + v.count()).sum::<usize>(),
            _ => 1,
        }
    }
}

/// How YAML 1.2's core schema reads a plain scalar.
#[derive(Debug, PartialEq)]
pub enum PlainType {
    Null,
    Bool(bool),
    Int(i128),
    Float,
    Str,
}

pub fn plain_type(s: &str) -> PlainType {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return PlainType::Null,
        "true" | "True" | "TRUE" => return PlainType::Bool(true),
        "false" | "False" | "FALSE" => return PlainType::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = s.parse::<i128>() {
            return PlainType::Int(v);
        }
    }
    if let Some(h) = s.strip_prefix("0x") {
        if let Ok(v) = i128::from_str_radix(h, 16) {
            return PlainType::Int(v);
        }
    }
    if let Some(o) = s.strip_prefix("0o") {
        if let Ok(v) = i128::from_str_radix(o, 8) {
            return PlainType::Int(v);
        }
    }
    let lower = s.to_ascii_lowercase();
    if matches!(lower.as_str(), ".inf" | "+.inf" | "-.inf" | ".nan")
        || (s.bytes().any(|b| b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && s.parse::<f64>().is_ok())
    {
        return PlainType::Float;
    }
    PlainType::Str
}

/// A YAML problem that stops tree building.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub span: Span,
    pub message: String,
    pub hint: Option<String>,
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

fn span(s: &GSpan) -> Span {
    Span {
        start: pos(&s.start),
        end: pos(&s.end),
    }
}

enum Open {
    Seq(Span, usize, Vec<Node>),
    Map(Span, usize, Vec<(Node, Node)>, Option<Node>),
}

/// A comment as written: where its `#` is and its text after the `#` (trailing blanks cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub pos: Pos,
    pub text: String,
}

/// Parse one YAML document into a located tree. An empty document gives `Kind::Null`.
pub fn parse(text: &str, limits: Limits) -> Result<Node, SyntaxError> {
    parse_with_comments(text, limits).map(|(node, _)| node)
}

/// [`parse`], also returning the document's comments in source order.
pub fn parse_with_comments(
    text: &str,
    limits: Limits,
) -> Result<(Node, Vec<Comment>), SyntaxError> {
    let mut options = Options::default();
    // The parser buffers the comments it meets while looking ahead for a key; its default cap
    // (96) refuses a long comment block between `key:` and a list. A comment takes at least one
    // byte of the text, so the text's length bounds the buffer as tightly as needed.
    options.max_buffered_comment_events = text.len();
    let mut parser = Parser::new_from_str_with_options(text, options);
    let mut comments: Vec<Comment> = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: Vec<(usize, Node)> = Vec::new();
    let mut nodes = 0usize;
    let mut scalar_bytes = 0usize;
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let err = |sp: Span, msg: String, hint: Option<&str>| SyntaxError {
        span: sp,
        message: msg,
        hint: hint.map(str::to_string),
    };
    while let Some(next) = parser.next_event() {
        let (event, gspan) = match next {
            Ok(e) => e,
            Err(e) => {
                let m = e.marker();
                if e.info().contains("recursion limit") {
                    return Err(err(
                        Span::point(m.line(), m.col() + 1),
                        "nesting too deep".into(),
                        Some("a manifest never nests this deep; is the file generated wrongly?"),
                    ));
                }
                return Err(err(
                    Span::point(m.line(), m.col() + 1),
                    format!("YAML syntax: {}", e.info()),
                    Some("check indentation, quotes and that every `key:` has a space after the colon"),
                ));
            }
        };
        let sp = span(&gspan);
        let completed: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => None,
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    return Err(err(
                        sp,
                        "a manifest is one YAML document, this file has several".into(),
                        Some("remove the second `---` or split the file"),
                    ));
                }
                None
            }
            Event::Alias(id) => {
                let Some((_, n)) = anchors.iter().rev().find(|(a, _)| *a == id) else {
                    return Err(err(
                        sp,
                        "alias to an anchor that is not complete yet".into(),
                        None,
                    ));
                };
                nodes += n.count();
                if nodes > limits.max_nodes {
                    return Err(budget(sp, "aliases expand to", limits.max_nodes));
                }
                let mut copy = n.clone();
                copy.span = sp;
                Some((copy, 0))
            }
            Event::Scalar(value, style, anchor, _tag) => {
                nodes += 1;
                scalar_bytes += value.len();
                if nodes > limits.max_nodes {
                    return Err(budget(sp, "the document has", limits.max_nodes));
                }
                if scalar_bytes > limits.max_scalar_bytes {
                    return Err(err(
                        sp,
                        format!(
                            "the document's text values exceed {} MiB",
                            limits.max_scalar_bytes >> 20
                        ),
                        None,
                    ));
                }
                let kind = match style {
                    ScalarStyle::Plain if plain_type(&value) == PlainType::Null => Kind::Null,
                    ScalarStyle::Plain => Kind::Scalar(value.into_owned(), Style::Plain),
                    ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => {
                        Kind::Scalar(value.into_owned(), Style::Quoted)
                    }
                    _ => Kind::Scalar(value.into_owned(), Style::Block),
                };
                Some((Node { span: sp, kind }, anchor))
            }
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                nodes += 1;
                if nodes > limits.max_nodes {
                    return Err(budget(sp, "the document has", limits.max_nodes));
                }
                if stack.len() >= limits.max_depth {
                    return Err(err(
                        sp,
                        format!("nesting deeper than {} levels", limits.max_depth),
                        Some("a manifest never nests this deep; is the file generated wrongly?"),
                    ));
                }
                if matches!(event, Event::SequenceStart(..)) {
                    stack.push(Open::Seq(sp, anchor, Vec::new()));
                } else {
                    stack.push(Open::Map(sp, anchor, Vec::new(), None));
                }
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Open::Seq(start, anchor, items)) => Some((
                    Node {
                        span: Span {
                            start: start.start,
                            end: sp.end,
                        },
                        kind: Kind::Seq(items),
                    },
                    anchor,
                )),
                Some(Open::Map(start, anchor, entries, _)) => Some((
                    Node {
                        span: Span {
                            start: start.start,
                            end: sp.end,
                        },
                        kind: Kind::Map(entries),
                    },
                    anchor,
                )),
                None => return Err(err(sp, "unbalanced YAML structure".into(), None)),
            },
            Event::UnresolvedAlias(name) => {
                return Err(err(sp, format!("alias `*{name}` has no anchor"), None));
            }
            Event::Comment(body, _) => {
                comments.push(Comment {
                    pos: sp.start,
                    text: body.trim_end().to_string(),
                });
                None
            }
            _ => None,
        };
        let Some((node, anchor)) = completed else {
            continue;
        };
        if anchor != 0 {
            anchors.push((anchor, node.clone()));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Open::Seq(_, _, items)) => items.push(node),
            Some(Open::Map(_, _, entries, pending)) => match pending.take() {
                None => {
                    if !matches!(node.kind, Kind::Scalar(..) | Kind::Null) {
                        return Err(err(
                            node.span,
                            "a mapping key must be a plain word, not a list or mapping".into(),
                            None,
                        ));
                    }
                    *pending = Some(node);
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
    let root = root.unwrap_or(Node {
        span: Span::point(1, 1),
        kind: Kind::Null,
    });
    // The parser reports a block scalar's header comment after the scalar.
    comments.sort_by_key(|c| c.pos);
    Ok((merge_keys(root), comments))
}

fn budget(sp: Span, what: &str, max: usize) -> SyntaxError {
    SyntaxError {
        span: sp,
        message: format!("{what} more than {max} YAML nodes"),
        hint: Some("this looks like an alias bomb or a runaway generator".into()),
    }
}

/// Apply YAML merge keys (`<<: *base`): entries of the merged mappings that the mapping does
/// not set itself. Bounded: the tree was built within the node budget and merges only copy.
fn merge_keys(node: Node) -> Node {
    let Node { span, kind } = node;
    let kind = match kind {
        Kind::Seq(items) => Kind::Seq(items.into_iter().map(merge_keys).collect()),
        Kind::Map(entries) => {
            let mut own: Vec<(Node, Node)> = Vec::new();
            let mut merged: Vec<(Node, Node)> = Vec::new();
            for (k, v) in entries {
                let v = merge_keys(v);
                if k.as_str() == Some("<<") && matches!(k.kind, Kind::Scalar(_, Style::Plain)) {
                    let sources: Vec<Node> = match v.kind {
                        Kind::Seq(s) => s,
                        other => vec![Node {
                            span: v.span,
                            kind: other,
                        }],
                    };
                    for s in sources {
                        if let Kind::Map(m) = s.kind {
                            for (mk, mv) in m {
                                if !merged.iter().any(|(x, _)| x.as_str() == mk.as_str()) {
                                    merged.push((mk, mv));
                                }
                            }
                        }
                    }
                } else {
                    own.push((k, v));
                }
            }
            for (mk, mv) in merged {
                if !own.iter().any(|(x, _)| x.as_str() == mk.as_str()) {
                    own.push((mk, mv));
                }
            }
            Kind::Map(own)
        }
        other => other,
    };
    Node { span, kind }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_one_based() {
        let n = parse("a:\n  b: [1, x]\n", Limits::default()).unwrap();
        let b = n.get("a").unwrap().get("b").unwrap();
        assert_eq!(b.span.start, Pos { line: 2, col: 6 });
        let x = &b.as_seq().unwrap()[1];
        assert_eq!(x.as_str(), Some("x"));
        assert_eq!(x.span.start, Pos { line: 2, col: 10 });
    }

    #[test]
    fn alias_bomb_is_bounded() {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            s.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&s, Limits::default()).unwrap_err();
        assert!(e.message.contains("more than 100000 YAML nodes"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let s = "[".repeat(100_000);
        let e = parse(&s, Limits::default()).unwrap_err();
        assert!(e.message.contains("nest"), "{e:?}");
        let s = (0..200)
            .map(|i| format!("{}- \n", "  ".repeat(i)))
            .collect::<String>();
        assert!(parse(&s, Limits::default()).is_err());
    }

    #[test]
    fn comments_come_with_their_places() {
        let (_, c) = parse_with_comments(
            "# head\na: | # hdr\n  # text, not a comment\nb: 1 # right \n",
            Limits::default(),
        )
        .unwrap();
        let got: Vec<(usize, usize, &str)> = c
            .iter()
            .map(|c| (c.pos.line, c.pos.col, c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [(1, 1, " head"), (2, 6, " hdr"), (4, 6, " right")],
            "{c:?}"
        );
    }

    #[test]
    fn a_long_comment_block_before_a_list_parses() {
        // Over the parser's default buffer of 96 comments met while looking for a key.
        let mut s = String::from("vms:\n");
        for i in 0..300 {
            s.push_str(&format!("  # note {i}\n"));
        }
        s.push_str("  - name: a\n");
        let (n, c) = parse_with_comments(&s, Limits::default()).unwrap();
        assert_eq!(c.len(), 300);
        assert!(n.get("vms").is_some());
    }

    #[test]
    fn merge_keys_fill_missing_entries() {
        let n = parse("b: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}\n", Limits::default()).unwrap();
        let c = n.get("c").unwrap();
        assert_eq!(c.get("x").unwrap().as_str(), Some("1"));
        assert_eq!(c.get("y").unwrap().as_str(), Some("3"));
    }
}
