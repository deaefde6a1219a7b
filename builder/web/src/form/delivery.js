import { getIn, setIn } from '../doc.js';

// Names listed in a `{files: [{name}]}` list (httpDirectory, a VM's floppy).
export const listed = (doc, path) => new Set((getIn(doc, path) || []).map((f) => f?.name));

// Add or remove `name` in the `{files: [{name}]}` list at `path`; an emptied list removes its
// key, and an emptied parent (`httpDirectory`, `floppy`) goes with it.
export function toggleListed(doc, path, name, on) {
  const cur = (getIn(doc, path) || []).filter((f) => f?.name !== name);
  const next = on ? [...cur, { name }] : cur;
  let d = setIn(doc, path, next.length ? next : undefined);
  const parent = path.slice(0, -1);
  const obj = getIn(d, parent);
  if (obj && typeof obj === 'object' && Object.keys(obj).length === 0) d = setIn(d, parent, undefined);
  return d;
}
