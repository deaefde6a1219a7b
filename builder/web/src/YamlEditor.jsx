// The YAML tab: the text with a line gutter; lines with errors are marked, and every
// diagnostic is listed with its line and column.
export default function YamlEditor({ text, diags, onChange }) {
  const lines = text.split('\n');
  const byLine = new Map();
  for (const d of diags) {
    const l = byLine.get(d.line) || [];
    l.push(d);
    byLine.set(d.line, l);
  }
  return (
    <div className="yaml">
      <div className="editor">
        <div className="gutter" aria-hidden="true">
          {lines.map((_, i) => {
            const ds = byLine.get(i + 1);
            const sev = ds && (ds.some((d) => d.severity === 'error') ? 'err' : 'warn');
            return (
              <div key={i} className={sev || ''} data-testid={sev ? `gutter-${sev}` : undefined} data-line={i + 1} title={ds ? ds.map((d) => d.message).join('\n') : ''}>
                {i + 1}
              </div>
            );
          })}
        </div>
        <textarea
          data-testid="yaml"
          spellCheck={false}
          wrap="off"
          value={text}
          rows={lines.length + 1}
          onChange={(e) => onChange(e.target.value)}
        />
      </div>
      <ul className="diags" data-testid="yaml-diags">
        {diags.map((d, i) => (
          <li key={i} className={d.severity} data-line={d.line}>
            {d.line}:{d.column}: {d.severity}: {d.message}
            {d.hint ? <em> ({d.hint})</em> : null}
          </li>
        ))}
      </ul>
    </div>
  );
}
