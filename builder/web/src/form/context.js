import { createContext, useContext } from 'react';
import { getIn, pathKey } from '../doc.js';

// What every part of the form reads: the document, the setter, the diagnostics, the schema's
// field help, and the base path (`['spec']` for envelope manifests, `[]` otherwise).
export const FormCtx = createContext(null);

export const useForm = () => useContext(FormCtx);

// One field: its value, a setter, the diagnostics that name exactly its path, its help text.
export function useField(path) {
  const ctx = useContext(FormCtx);
  const key = pathKey(path);
  const mine = ctx.diagsAt(key);
  // `set` here is the field's own; the form-wide setter stays reachable as `setAt`.
  return { ...ctx, setAt: ctx.set, value: getIn(ctx.doc, path), set: (v) => ctx.set(path, v), mine, help: ctx.helpAt(path) };
}

// The DOM id a field's help text gets, for aria-describedby.
export const helpId = (path) => `help-${pathKey(path)}`;
