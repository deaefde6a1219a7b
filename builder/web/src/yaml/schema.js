// Lookups in the manifest's JSON Schema (what `kiln schema` prints, served at /api/schema):
// the schema nodes that may stand at a YAML path, the keys allowed there, and the values a
// scalar may take. `$ref`s are followed and `anyOf`/`oneOf`/`allOf` branches taken together,
// so a place that may hold several shapes offers the union of their keys.

// Follows `#/$defs/...` references and flattens alternatives into a list of plain nodes.
export function expand(root, node, seen = new Set()) {
  if (node == null || typeof node !== 'object') return [];
  if (typeof node.$ref === 'string') {
    if (seen.has(node.$ref)) return [];
    seen.add(node.$ref);
    const target = follow(root, node.$ref);
    // A `$ref` beside its own `description` (the field's doc) keeps that doc.
    const { $ref, ...rest } = node;
    return [...(Object.keys(rest).length ? [rest] : []), ...expand(root, target, seen)];
  }
  const out = [node];
  for (const k of ['anyOf', 'oneOf', 'allOf']) {
    if (Array.isArray(node[k])) for (const b of node[k]) out.push(...expand(root, b, new Set(seen)));
  }
  return out;
}

function follow(root, ref) {
  if (!ref.startsWith('#/')) return null;
  let v = root;
  for (const part of ref.slice(2).split('/')) {
    if (v == null || typeof v !== 'object') return null;
    v = v[part.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  return v;
}

// The schema nodes for the value at `path` (map keys as strings, list indices as numbers).
export function nodesAt(root, path) {
  let nodes = expand(root, root);
  for (const step of path) {
    const next = [];
    for (const n of nodes) {
      if (typeof step === 'number') {
        if (n.items && typeof n.items === 'object') next.push(...expand(root, n.items));
      } else {
        if (n.properties && Object.hasOwn(n.properties, step)) next.push(...expand(root, n.properties[step]));
        else if (n.additionalProperties && typeof n.additionalProperties === 'object') {
          next.push(...expand(root, n.additionalProperties));
        }
      }
    }
    nodes = next;
    if (!nodes.length) break;
  }
  return nodes;
}

// The keys a mapping at `path` may hold: [{name, description, type, required}], each once.
export function keysAt(root, path) {
  const byName = new Map();
  for (const n of nodesAt(root, path)) {
    if (!n.properties) continue;
    const required = new Set(Array.isArray(n.required) ? n.required : []);
    for (const [name, prop] of Object.entries(n.properties)) {
      if (byName.has(name)) continue;
      const info = describe(root, prop);
      byName.set(name, { name, ...info, required: required.has(name) });
    }
  }
  return [...byName.values()];
}

// The scalar values allowed at `path`: enum members, consts and booleans.
export function valuesAt(root, path) {
  const out = [];
  const add = (v) => { if (!out.some((o) => o === v)) out.push(v); };
  for (const n of nodesAt(root, path)) {
    if (Array.isArray(n.enum)) n.enum.forEach(add);
    if (Object.hasOwn(n, 'const')) add(n.const);
    const types = [].concat(n.type ?? []);
    if (n.type === 'boolean') { add(true); add(false); }
    else if (types.length === 1 && types[0] === 'boolean') { add(true); add(false); }
  }
  return out;
}

// What a schema node says about itself: its description and a short type ("object",
// "list of object", "one of: a, b", "string | integer").
export function describe(root, node) {
  const nodes = expand(root, node);
  const description = nodes.map((n) => n.description).find((d) => typeof d === 'string') || '';
  return { description, type: typeName(root, nodes) };
}

function typeName(root, nodes) {
  for (const n of nodes) {
    if (Array.isArray(n.enum)) return `one of: ${n.enum.join(', ')}`;
    if (Object.hasOwn(n, 'const')) return `${JSON.stringify(n.const)}`;
  }
  const names = [];
  for (const n of nodes) {
    let t = n.type ?? (n.properties ? 'object' : n.items ? 'array' : null);
    if (t == null) continue;
    for (const one of [].concat(t)) {
      const name = one === 'array' && n.items ? `list of ${itemName(root, n.items)}` : one;
      if (!names.includes(name)) names.push(name);
    }
  }
  return names.join(' | ');
}

function itemName(root, items) {
  const nodes = expand(root, items);
  return typeName(root, nodes) || 'any';
}

// Everything known about the key at the end of `path`: its description and type.
export function keyInfo(root, path) {
  if (!path.length || typeof path[path.length - 1] !== 'string') return null;
  const nodes = nodesAt(root, path);
  if (!nodes.length) return null;
  return describe(root, { anyOf: nodes });
}
