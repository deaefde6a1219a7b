//! Where each comment of a manifest goes when `kiln fmt` rewrites it.
//!
//! Comments are tied to the *path* of a map entry or list item (`vms` > `web` > `disks` > 0),
//! not to a place in the text, so they follow their key when fmt reorders keys, and the
//! editor's `/api/yaml` (which formats a JSON document with no places at all) finds them too.
//! A list item's path segment is its `name` when that is unique among its siblings, so a
//! comment stays with its VM when the editor removes the one before it.
//!
//! Each comment of the source is placed by the parser's positions:
//! - beside a value (`key: v  # c`): *right* of the deepest entry or item starting on its line;
//! - on a line of its own: *leading* the next entry or item, unless it is indented deeper than
//!   that one, which makes it the *end* of the innermost open collection it is indented into
//!   (a comment after the last disk, at the disks' indentation, ends the disks list);
//! - above the first key: the file's header, except a last group glued to that key after a
//!   blank line, which leads the key.
//!
//! A blank line before a comment, or between a comment block and its entry, is kept (one at
//! most), so comment blocks stay apart.

use std::collections::{BTreeMap, HashMap};

use super::super::diag::Pos;
use super::super::yaml::{self, Kind, Limits, Node, Style};

/// One step of a path: a mapping key, or a list item by `name` or by index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Named(String),
    Index(usize),
}

pub type Path = Vec<Seg>;

/// The segments of a list's items: each item's `name` when no sibling shares it, else its
/// index.
pub fn item_segs(items: &[Node]) -> Vec<Seg> {
    fn name(n: &Node) -> Option<&str> {
        n.get("name").and_then(Node::as_str)
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for it in items {
        if let Some(n) = name(it) {
            *count.entry(n).or_default() += 1;
        }
    }
    items
        .iter()
        .enumerate()
        .map(|(i, it)| match name(it) {
            Some(n) if count.get(n) == Some(&1) => Seg::Named(n.to_string()),
            _ => Seg::Index(i),
        })
        .collect()
}

/// The segment of a mapping key.
pub fn key_seg(k: &Node) -> Seg {
    Seg::Key(k.as_str().unwrap_or_default().to_string())
}

/// A line of a comment block: a comment (its text after `#`) or a blank line between blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Blank,
    /// `line` is the source line, to keep the source order of comments fmt could not place.
    Comment {
        text: String,
        line: usize,
    },
}

#[derive(Debug, Default)]
struct Attached {
    leading: Vec<Line>,
    right: Vec<Line>,
    end: Vec<Line>,
}

/// The comments of a source text, by where they belong. Formatting takes them out as it
/// writes each entry; whatever is left at the end is written at the end, never dropped.
#[derive(Debug, Default)]
pub struct Comments {
    head: Vec<Line>,
    by_path: BTreeMap<Path, Attached>,
}

/// An entry or item of the source tree, where it starts and where its `-` or key is.
struct Anchor {
    path: Path,
    start: Pos,
    parent: Option<usize>,
    /// Where the value's last token ends, when that is a scalar or a flow collection's
    /// closing bracket (a block collection has no end of its own).
    value_end: Option<Pos>,
}

enum Slot {
    Head,
    Leading(usize),
    Right(usize),
    End(Path),
}

impl Comments {
    /// The comments of `text`. Text that does not parse keeps its leading comment block only
    /// (the editor may hold such text; fmt itself only formats valid manifests).
    pub fn from_source(text: &str) -> Comments {
        match yaml::parse_with_comments(text, Limits::default()) {
            Ok((root, comments)) => place(text, &root, comments),
            Err(_) => Comments {
                head: leading_block(text),
                ..Comments::default()
            },
        }
    }

    pub fn take_head(&mut self) -> Vec<Line> {
        std::mem::take(&mut self.head)
    }

    pub fn take_leading(&mut self, path: &Path) -> Vec<Line> {
        self.by_path
            .get_mut(path)
            .map(|a| std::mem::take(&mut a.leading))
            .unwrap_or_default()
    }

    pub fn take_right(&mut self, path: &Path) -> Vec<Line> {
        self.by_path
            .get_mut(path)
            .map(|a| std::mem::take(&mut a.right))
            .unwrap_or_default()
    }

    pub fn take_end(&mut self, path: &Path) -> Vec<Line> {
        self.by_path
            .get_mut(path)
            .map(|a| std::mem::take(&mut a.end))
            .unwrap_or_default()
    }

    /// Every comment inside what `path` names (its own end comments and all below it), in
    /// source order: for a value written on one line, where nothing inside can carry them.
    pub fn take_inside(&mut self, path: &Path) -> Vec<Line> {
        let mut lines = self.take_end(path);
        for (p, a) in self.by_path.range_mut(path.clone()..) {
            if !p.starts_with(path) {
                break;
            }
            if p.len() > path.len() {
                lines.append(&mut a.leading);
                lines.append(&mut a.right);
                lines.append(&mut a.end);
            }
        }
        by_source_line(lines)
    }

    /// Every comment of `path` (leading, right, inside).
    pub fn take_all(&mut self, path: &Path) -> Vec<Line> {
        let mut lines = self.take_leading(path);
        lines.append(&mut self.take_right(path));
        lines.append(&mut self.take_inside(path));
        by_source_line(lines)
    }

    /// What no written entry took (its path is not in the written tree), in source order.
    pub fn take_rest(&mut self) -> Vec<Line> {
        let mut lines = self.take_head();
        for a in self.by_path.values_mut() {
            lines.append(&mut a.leading);
            lines.append(&mut a.right);
            lines.append(&mut a.end);
        }
        by_source_line(lines)
    }
}

/// Comments sorted by source line, blank lines dropped (their neighbours moved).
fn by_source_line(lines: Vec<Line>) -> Vec<Line> {
    let mut c: Vec<Line> = lines
        .into_iter()
        .filter(|l| matches!(l, Line::Comment { .. }))
        .collect();
    c.sort_by_key(|l| match l {
        Line::Comment { line, .. } => *line,
        Line::Blank => 0,
    });
    c
}

/// The comment lines at the top of a text, as fmt kept them before it knew about others.
fn leading_block(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(body) = t.strip_prefix('#') {
            out.push(Line::Comment {
                text: body.trim_end().to_string(),
                line: i + 1,
            });
        } else if !t.is_empty() {
            break;
        }
    }
    out
}

fn place(text: &str, root: &Node, comments: Vec<yaml::Comment>) -> Comments {
    let lines: Vec<&str> = text.lines().collect();
    let blank = |line: usize| {
        line >= 1
            && lines
                .get(line - 1)
                .is_some_and(|l| l.trim_matches([' ', '\t', '\r']).is_empty())
    };
    let mut anchors = Vec::new();
    walk(root, &mut Vec::new(), None, &lines, &mut anchors);
    anchors.sort_by_key(|a| a.start);
    let mut ends_on_line: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, a) in anchors.iter().enumerate() {
        if let Some(e) = a.value_end {
            ends_on_line.entry(e.line).or_default().push(i);
        }
    }

    let mut c = Comments::default();
    let mut leading: Vec<Vec<Line>> = (0..anchors.len()).map(|_| Vec::new()).collect();
    for cm in comments {
        let l = cm.pos.line;
        let own_line = lines.get(l - 1).is_some_and(|t| {
            t.chars()
                .take(cm.pos.col.saturating_sub(1))
                .all(|ch| ch == ' ' || ch == '\t')
        });
        let slot = if own_line {
            let next = anchors.partition_point(|a| a.start.line <= l);
            let prev = anchors.partition_point(|a| a.start.line < l).checked_sub(1);
            match (next < anchors.len(), prev) {
                (true, None) => Slot::Leading(next),
                (true, Some(_)) if cm.pos.col <= anchors[next].start.col => Slot::Leading(next),
                (_, Some(p)) => {
                    // The innermost entry around the comment that it is indented into.
                    let mut a = Some(p);
                    while let Some(i) = a.filter(|&i| anchors[i].start.col > cm.pos.col) {
                        a = anchors[i].parent;
                    }
                    match a {
                        Some(i) => {
                            let mut parent = anchors[i].path.clone();
                            parent.pop();
                            Slot::End(parent)
                        }
                        None => Slot::End(Vec::new()),
                    }
                }
                (false, None) => Slot::Head,
            }
        } else {
            // The entry whose value ends last on this line before the comment, the outermost
            // on a tie (`file: {a: 1, b: 2} # c` is about `file`, `[a, # c` about `a`), else
            // the deepest one started before.
            let whole = ends_on_line
                .get(&l)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| anchors[i].value_end.is_some_and(|e| e <= cm.pos))
                .min_by_key(|&i| (std::cmp::Reverse(anchors[i].value_end), anchors[i].start));
            let before = anchors.partition_point(|a| a.start < cm.pos);
            match whole.or(before.checked_sub(1)) {
                Some(i) => Slot::Right(i),
                None => Slot::Head,
            }
        };
        let line = Line::Comment {
            text: cm.text,
            line: l,
        };
        let target = match slot {
            Slot::Head => &mut c.head,
            Slot::Leading(i) => &mut leading[i],
            Slot::Right(i) => &mut c.entry(&anchors[i].path).right,
            Slot::End(p) => &mut c.entry(&p).end,
        };
        if own_line && blank(l - 1) {
            target.push(Line::Blank);
        }
        target.push(line);
    }
    for (i, mut lead) in leading.into_iter().enumerate() {
        if lead.is_empty() {
            continue;
        }
        if blank(anchors[i].start.line - 1) {
            lead.push(Line::Blank);
        }
        if i == 0 {
            // The header: all of the block above the first key, except a last group that is
            // glued to the key and set apart from the rest by a blank line.
            let glued = !matches!(lead.last(), Some(Line::Blank));
            match lead.iter().rposition(|l| *l == Line::Blank) {
                Some(b) if glued => {
                    let own = lead.split_off(b + 1);
                    c.head.append(&mut lead);
                    lead = own;
                }
                _ => {
                    c.head.append(&mut lead);
                    continue;
                }
            }
        }
        // Appended: two entries share a path only in invalid text (a duplicate key).
        c.entry(&anchors[i].path).leading.append(&mut lead);
    }
    c
}

impl Comments {
    fn entry(&mut self, path: &Path) -> &mut Attached {
        self.by_path.entry(path.clone()).or_default()
    }
}

/// The entries and items of the tree in document order. Alias copies and merged entries carry
/// the places of the text they copy, before their own: they are skipped, so each comment has
/// one owner, the text it was written in.
fn walk(
    node: &Node,
    path: &mut Path,
    parent: Option<usize>,
    lines: &[&str],
    out: &mut Vec<Anchor>,
) {
    match &node.kind {
        Kind::Map(entries) => {
            for (k, v) in entries {
                if k.span.start < node.span.start {
                    continue;
                }
                path.push(key_seg(k));
                out.push(Anchor {
                    path: path.clone(),
                    start: k.span.start,
                    parent,
                    value_end: token_end(v, lines),
                });
                let me = out.len() - 1;
                walk(v, path, Some(me), lines, out);
                path.pop();
            }
        }
        Kind::Seq(items) => {
            for (it, seg) in items.iter().zip(item_segs(items)) {
                if it.span.start < node.span.start {
                    continue;
                }
                path.push(seg);
                out.push(Anchor {
                    path: path.clone(),
                    start: dash(it.span.start, lines),
                    parent,
                    value_end: token_end(it, lines),
                });
                let me = out.len() - 1;
                walk(it, path, Some(me), lines, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Where a value's text ends, for a scalar or a flow collection (see [`Anchor::value_end`]).
fn token_end(v: &Node, lines: &[&str]) -> Option<Pos> {
    match &v.kind {
        // A block scalar (and an empty value) ends where the next token starts.
        Kind::Scalar(_, Style::Plain | Style::Quoted) => Some(v.span.end),
        Kind::Scalar(_, Style::Block) | Kind::Null => None,
        Kind::Map(_) | Kind::Seq(_) => {
            let line = lines.get(v.span.end.line.checked_sub(1)?)?;
            let last = line.chars().nth(v.span.end.col.checked_sub(2)?)?;
            matches!(last, ']' | '}').then_some(v.span.end)
        }
    }
}

/// Where a block list item starts: at its `-` when that is on the item's line.
fn dash(start: Pos, lines: &[&str]) -> Pos {
    let Some(line) = start.line.checked_sub(1).and_then(|l| lines.get(l)) else {
        return start;
    };
    let before: Vec<char> = line.chars().take(start.col.saturating_sub(1)).collect();
    let mut i = before.len();
    while i > 0 && (before[i - 1] == ' ' || before[i - 1] == '\t') {
        i -= 1;
    }
    if i > 0 && before[i - 1] == '-' && i < before.len() {
        Pos {
            line: start.line,
            col: i,
        }
    } else {
        start
    }
}
