import { pathKey } from '../doc.js';
import { useField, helpId } from './context.js';
import './Fields.css';

const errorsId = (path) => `errors-${pathKey(path)}`;

// What describes a field to a screen reader: its help text and its diagnostics.
const describedBy = (path, help, mine) =>
  [help ? helpId(path) : null, mine.length ? errorsId(path) : null].filter(Boolean).join(' ') || undefined;

// The diagnostics shown under a field (or an item).
export function Problems({ mine, path }) {
  if (!mine.length) return null;
  return (
    <div className="field-errors" data-testid={`error-${pathKey(path)}`} id={errorsId(path)}>
      {mine.map((d, i) => (
        <div key={i} className={d.severity}>{d.message}{d.hint ? <span className="hint"> ({d.hint})</span> : null}</div>
      ))}
    </div>
  );
}

// The schema's description of a field: a "?" mark with the text as its tooltip, and the text
// itself shown while the field has focus (and read by screen readers through aria-describedby).
export function Help({ text, path }) {
  if (!text) return null;
  return (
    <>
      <span className="help-mark" title={text} aria-hidden="true">?</span>
      <small className="help" id={helpId(path)} data-testid={`help-${pathKey(path)}`}>{text}</small>
    </>
  );
}

const invalid = (mine) => (mine.some((d) => d.severity === 'error') ? 'invalid' : '');

// A text input: empty removes the key. `numeric` stores integers as numbers.
export function Text({ label, path, numeric, placeholder, multiline, wide }) {
  const { value, set, mine, help } = useField(path);
  const shown = value == null ? '' : typeof value === 'object' ? JSON.stringify(value) : String(value);
  const onChange = (e) => {
    const s = e.target.value;
    if (s === '') return set(undefined);
    if (numeric && /^-?\d+$/.test(s)) return set(Number(s));
    set(s);
  };
  const props = {
    'data-path': pathKey(path),
    className: invalid(mine),
    'aria-invalid': invalid(mine) ? 'true' : undefined,
    'aria-describedby': describedBy(path, help, mine),
    value: shown,
    placeholder,
    onChange,
  };
  return (
    <label className={`field${wide || multiline ? ' wide' : ''}`}>
      <span className="label">{label}<Help text={help} path={path} /></span>
      {multiline ? <textarea rows={4} spellCheck={false} {...props} /> : <input {...props} />}
      <Problems mine={mine} path={path} />
    </label>
  );
}

export function Check({ label, path, dflt, onToggle }) {
  const { value, set, mine, help } = useField(path);
  return (
    <label className="field check">
      <input type="checkbox" data-path={pathKey(path)} checked={value == null ? !!dflt : !!value}
        aria-describedby={describedBy(path, help, mine)}
        onChange={(e) => (onToggle ? onToggle(e.target.checked) : set(e.target.checked))} />
      <span className="label">{label}<Help text={help} path={path} /></span>
      <Problems mine={mine} path={path} />
    </label>
  );
}

// A select over `options`; `allowEmpty` offers "(default)", which removes the key. A value
// the options do not list is still shown (so the form never hides what the YAML says).
export function Select({ label, path, options, allowEmpty, onPick }) {
  const { value, set, mine, help } = useField(path);
  return (
    <label className="field">
      <span className="label">{label}<Help text={help} path={path} /></span>
      <select data-path={pathKey(path)} value={value ?? ''} className={invalid(mine)}
        aria-describedby={describedBy(path, help, mine)}
        onChange={(e) => {
          const v = e.target.value === '' ? undefined : e.target.value;
          onPick ? onPick(v) : set(v);
        }}>
        {(allowEmpty || value == null) && <option value="">{allowEmpty ? '(default)' : '(none)'}</option>}
        {value != null && !options.includes(value) && <option value={value}>{String(value)}</option>}
        {options.map((o) => <option key={o} value={o}>{o}</option>)}
      </select>
      <Problems mine={mine} path={path} />
    </label>
  );
}

// Diagnostics for a whole item or section (a missing required field points at its item).
export function ItemProblems({ path }) {
  const { mine } = useField(path);
  return <Problems mine={mine} path={path} />;
}

// A list of words edited as one space-separated input (bootstrap packages).
export function Words({ label, path }) {
  const { value, set, mine, help } = useField(path);
  const shown = Array.isArray(value) ? value.join(' ') : '';
  return (
    <label className="field">
      <span className="label">{label}<Help text={help} path={path} /></span>
      <input data-path={pathKey(path)} value={shown} className={invalid(mine)}
        aria-describedby={describedBy(path, help, mine)}
        onChange={(e) => set(e.target.value.split(/\s+/).filter(Boolean))} />
      <Problems mine={mine} path={path} />
    </label>
  );
}

// A list of strings edited one a line (boot command); each line's own diagnostics below.
export function Lines({ label, path }) {
  const { value, set, mine, help, diagsAt } = useField(path);
  const shown = Array.isArray(value) ? value.join('\n') : '';
  const each = Array.isArray(value) ? value.map((_, i) => diagsAt(pathKey([...path, i]))) : [];
  return (
    <label className="field wide">
      <span className="label">{label}<Help text={help} path={path} /></span>
      <textarea rows={4} spellCheck={false} data-path={pathKey(path)} value={shown}
        className={invalid([...mine, ...each.flat()])}
        aria-describedby={describedBy(path, help, mine)}
        onChange={(e) => set(e.target.value === '' ? undefined : e.target.value.split('\n'))} />
      <Problems mine={mine} path={path} />
      {each.map((m, i) => <Problems key={i} mine={m} path={[...path, i]} />)}
    </label>
  );
}
