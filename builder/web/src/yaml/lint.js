// The server's diagnostics (from /api/check, the validator's) as CodeMirror lint diagnostics:
// an underline from the diagnostic's column to its end column, a gutter marker, and the same
// `file:line:column: severity: message` text `kiln validate` prints.

export function message(name, d) {
  const head = `${name || 'manifest'}:${d.line}:${d.column}: ${d.severity}: ${d.message}`;
  return d.hint ? `${head}\n  = hint: ${d.hint}` : head;
}

// `doc` is the editor's Text; lines and columns are 1-based, columns count characters.
export function toCodeMirror(doc, name, diags) {
  const out = [];
  for (const d of diags) {
    const lineNo = Math.min(Math.max(d.line || 1, 1), doc.lines);
    const line = doc.line(lineNo);
    const from = line.from + Math.min(Math.max((d.column || 1) - 1, 0), line.length);
    let to = line.from + Math.min(Math.max((d.end_column || d.column || 1) - 1, 0), line.length);
    // No end given: the rest of the word at the column.
    if (to <= from) to = from + (/^\S*/.exec(line.text.slice(from - line.from))[0].length);
    out.push({ from, to, severity: d.severity === 'error' ? 'error' : 'warning', message: message(name, d) });
  }
  return out;
}
