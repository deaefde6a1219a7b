import { useEffect, useState } from 'react';
import { getSchema } from '../api.js';

// The JSON Schema `kiln schema` prints, fetched from the server once per page. A server
// without `/api/schema` (or any failure) leaves the form without help texts, nothing more.
let pending = null;
export function useSchema() {
  const [schema, setSchema] = useState(null);
  useEffect(() => {
    pending ??= getSchema().catch(() => null);
    let live = true;
    pending.then((s) => live && setSchema(s));
    return () => { live = false; };
  }, []);
  return schema;
}

function deref(schema, node) {
  let n = node;
  // A bounded walk: a schema that refers to itself in a loop cannot hang the page.
  for (let i = 0; i < 8 && n && n.$ref; i++) {
    const m = /^#\/\$defs\/(.+)$/.exec(n.$ref);
    n = m ? schema.$defs?.[m[1]] : null;
  }
  return n;
}

function walk(schema, node, path) {
  let n = deref(schema, node);
  for (let i = 0; i < path.length; i++) {
    if (!n) return null;
    // The root is "a bare manifest or an envelope": the first branch that has the path.
    if (n.anyOf) return n.anyOf.map((b) => walk(schema, b, path.slice(i))).find(Boolean) || null;
    const k = path[i];
    n = deref(schema, typeof k === 'number' ? n.items : n.properties?.[k]);
  }
  return n;
}

// The description of the field at a document path, or ''.
export function describe(schema, path) {
  if (!schema || typeof schema !== 'object') return '';
  const n = walk(schema, schema, path);
  return (n && typeof n.description === 'string' && n.description) || '';
}

// The enum of the field at a path (e.g. provisioner types), or null.
export function enumAt(schema, path) {
  if (!schema || typeof schema !== 'object') return null;
  const n = walk(schema, schema, path);
  return Array.isArray(n?.enum) ? n.enum : null;
}
