//! Diagnostics: every problem found in a manifest, with its place, the offending text and a hint.

use std::fmt::Write as _;

use serde::Serialize;

/// Widest part of a source line shown under a diagnostic.
const WINDOW: usize = 100;

/// A place in the manifest text: 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A range of the manifest text. `end` is exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Span {
    pub start: Pos,
    pub end: Pos,
}

impl Span {
    pub fn point(line: usize, col: usize) -> Span {
        let p = Pos { line, col };
        Span { start: p, end: p }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The manifest as the user named it.
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Where the offending text ends (same line), for underlining.
    #[serde(skip)]
    pub end_column: usize,
    pub message: String,
    /// The source line holding the offending text.
    pub text: Option<String>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:column: severity: message`, the source line with the offending text
    /// underlined, and the hint.
    pub fn render(&self) -> String {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = format!(
            "{}:{}:{}: {sev}: {}\n",
            self.file, self.line, self.column, self.message
        );
        if let Some(text) = &self.text {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            let chars: Vec<char> = text
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .collect();
            // Long lines (minified or generated files) show a window around the column.
            let start = if chars.len() > WINDOW {
                self.column.saturating_sub(1).saturating_sub(WINDOW / 2)
            } else {
                0
            };
            let end = chars.len().min(start + WINDOW);
            let mut shown: String = chars[start.min(end)..end].iter().collect();
            let mut lead = 0;
            if start > 0 {
                shown.insert_str(0, "...");
                lead = 3;
            }
            if end < chars.len() {
                shown.push_str("...");
            }
            let _ = writeln!(out, " {num} | {shown}");
            let caret_col = self.column.saturating_sub(1).saturating_sub(start) + lead;
            let width = self.end_column.saturating_sub(self.column).clamp(
                1,
                (end - start.min(end) + lead)
                    .saturating_sub(caret_col)
                    .max(1),
            );
            let _ = writeln!(
                out,
                " {pad} | {}{}",
                " ".repeat(caret_col),
                "^".repeat(width)
            );
        }
        if let Some(h) = &self.hint {
            let _ = writeln!(out, "  = hint: {h}");
        }
        out
    }
}

/// Collects diagnostics for one manifest, filling in file name and source lines.
pub(crate) struct Sink<'a> {
    file: String,
    lines: Vec<&'a str>,
    pub(crate) items: Vec<Diagnostic>,
    /// Lines holding a secret (`sshPassword`): diagnostics there do not quote the line.
    secret_lines: Vec<usize>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(file: String, text: &'a str) -> Self {
        Sink {
            file,
            lines: text.lines().collect(),
            items: Vec::new(),
            secret_lines: Vec::new(),
        }
    }

    /// Marks the lines of `at` as holding a secret: no diagnostic quotes them.
    pub(crate) fn secret(&mut self, at: Span) {
        self.secret_lines
            .extend(at.start.line..=at.end.line.max(at.start.line));
    }

    pub(crate) fn error(&mut self, at: Span, msg: impl Into<String>) -> Builder<'_, 'a> {
        self.push(Severity::Error, at, msg.into())
    }

    pub(crate) fn warn(&mut self, at: Span, msg: impl Into<String>) -> Builder<'_, 'a> {
        self.push(Severity::Warning, at, msg.into())
    }

    fn push(&mut self, severity: Severity, at: Span, message: String) -> Builder<'_, 'a> {
        let line = at.start.line.max(1);
        let column = at.start.col.max(1);
        let text = self.lines.get(line - 1).map(|l| l.to_string());
        let end_column = if at.end == at.start {
            column + 1
        } else if at.end.line == at.start.line && at.end.col > column {
            at.end.col
        } else {
            // Multi-line node: underline to the end of its first line.
            text.as_deref()
                .map(|t| t.trim_end().chars().count() + 1)
                .unwrap_or(column + 1)
                .max(column + 1)
        };
        self.items.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line,
            column,
            end_column,
            message,
            text,
            hint: None,
        });
        Builder { sink: self }
    }

    /// Errors first would hide the order of the file: sort by place, errors before warnings
    /// at the same place, and drop exact repeats (a value checked in two views).
    pub(crate) fn finish(mut self) -> Vec<Diagnostic> {
        self.items.sort_by(|a, b| {
            (a.line, a.column, a.severity, &a.message)
                .cmp(&(b.line, b.column, b.severity, &b.message))
        });
        self.items.dedup();
        for d in &mut self.items {
            if self.secret_lines.contains(&d.line) {
                d.text = None;
            }
        }
        self.items
    }
}

pub(crate) struct Builder<'s, 'a> {
    sink: &'s mut Sink<'a>,
}

impl Builder<'_, '_> {
    pub(crate) fn hint(self, h: impl Into<String>) -> Self {
        if let Some(d) = self.sink.items.last_mut() {
            d.hint = Some(h.into());
        }
        self
    }
}
