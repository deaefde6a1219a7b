import * as api from './api.js';
import { patchYaml } from './yaml/patch.js';

// Immutable edits of the JSON manifest document at a path. Only the edited branch is copied,
// so every field the form does not show survives untouched.
export function getIn(doc, path) {
  let v = doc;
  for (const k of path) {
    if (v == null || typeof v !== 'object') return undefined;
    v = v[k];
  }
  return v;
}

// Set `value` at `path`; `undefined` removes the key (or list item).
export function setIn(doc, path, value) {
  if (path.length === 0) return value;
  const [k, ...rest] = path;
  const base = doc != null && typeof doc === 'object' ? doc : typeof k === 'number' ? [] : {};
  const next = Array.isArray(base) ? base.slice() : { ...base };
  const child = setIn(base[k], rest, value);
  if (child === undefined) {
    if (Array.isArray(next)) next.splice(k, 1);
    else delete next[k];
  } else {
    next[k] = child;
  }
  return next;
}

export const pathKey = (path) => path.join('.');

// The YAML text of a document the Visual editor changed: `text` with only the changed values
// rewritten, so comments, key order and formatting elsewhere stay (yaml/patch.js); the
// server's canonical writer when that cannot be done (text the `yaml` package does not read).
export async function docToText(doc, text) {
  return patchYaml(text, doc) ?? api.toYaml(doc, text);
}
