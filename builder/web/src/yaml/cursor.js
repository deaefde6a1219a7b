// Where a cursor stands in a YAML text, found on the `yaml` package's parsed document (nodes
// with their source ranges), not on lines: the path of the mapping or value being typed (for
// completion) and the key under the pointer (for hover help).
import { parseDocument, isMap, isSeq, isPair, isScalar } from 'yaml';

// Stands in for the word being typed, so that a half-typed line still parses as a key or a
// value at its real place in the tree.
const MARK = 'kilnCursorMark';

// The word around `pos` that completion replaces.
export function wordAt(text, pos) {
  const before = /[\w.\-/]*$/.exec(text.slice(0, pos))[0];
  const after = /^[\w.\-/]*/.exec(text.slice(pos))[0];
  return { from: pos - before.length, to: pos + after.length, word: before };
}

// What may be typed at `pos`: {from, to, keys: {path, siblings} | null, value: {path} | null}.
// `keys` is set where a mapping key may go (the mapping's path and the keys it already has),
// `value` where a scalar value may go (the path of that value).
export function completionContext(text, pos) {
  const { from, to, word } = wordAt(text, pos);
  const lineStart = text.lastIndexOf('\n', from - 1) + 1;
  const lineEnd = text.indexOf('\n', to) === -1 ? text.length : text.indexOf('\n', to);
  const lead = text.slice(lineStart, from);
  const rest = text.slice(to, lineEnd);
  let keys = null;
  let value = null;
  // A bare word on its own line (or list item) is a key being started.
  const bare = /^\s*(-\s+)*$/.test(lead) && /^\s*(#.*)?$/.test(rest);
  if (bare) {
    const asKey = find(text.slice(0, from) + MARK + ':' + text.slice(to));
    if (asKey?.kind === 'key') keys = asKey;
  }
  // As typed: the word is a key (`word: x`) or a value (`key: word`, `- word`). A bare word
  // on a line of a mapping is no value (it would read as the end of the scalar above it).
  const asIs = find(text.slice(0, from) + MARK + text.slice(to));
  if (asIs?.kind === 'key' && !keys) keys = asIs;
  else if (asIs?.kind === 'value' && (!bare || /-\s+$/.test(lead))) value = asIs;
  if (!keys && !value) return null;
  return { from, to, word, keys, value };
}

function find(text) {
  // Other lines may be half-typed too: the tree the parser recovered is still used.
  const doc = parseDocument(text, { prettyErrors: false });
  let found = null;
  walk(doc.contents, [], {
    pair(pair, path) {
      if (isScalar(pair.key) && pair.key.value === MARK) {
        const siblings = [];
        found = { kind: 'key', path, siblings };
        return true;
      }
      if (isScalar(pair.value) && pair.value.value === MARK) {
        found = { kind: 'value', path: [...path, keyText(pair.key)] };
        return true;
      }
      return false;
    },
    item(node, path) {
      if (isScalar(node) && node.value === MARK) {
        found = { kind: 'value', path };
        return true;
      }
      return false;
    },
  });
  if (found?.kind === 'key') {
    const map = mapAt(doc.contents, found.path);
    if (map) {
      for (const p of map.items) {
        const k = keyText(p.key);
        if (k !== MARK) found.siblings.push(k);
      }
    }
  }
  return found;
}

function mapAt(node, path) {
  let n = node;
  for (const step of path) {
    if (isMap(n)) n = n.items.find((p) => keyText(p.key) === step)?.value;
    else if (isSeq(n)) n = n.items[step];
    else return null;
  }
  return isMap(n) ? n : null;
}

// The key under `pos`: {path (ending with that key), from, to}, or null.
export function keyAt(text, pos) {
  const doc = parseDocument(text, { prettyErrors: false });
  let found = null;
  walk(doc.contents, [], {
    pair(pair, path) {
      const r = pair.key?.range;
      if (isScalar(pair.key) && r && pos >= r[0] && pos <= r[1]) {
        found = { path: [...path, keyText(pair.key)], from: r[0], to: r[1] };
        return true;
      }
      return false;
    },
    item() { return false; },
  });
  return found;
}

export function keyText(k) {
  if (isScalar(k)) return String(k.value);
  return k == null ? '' : String(k);
}

// Visits pairs and list items depth first, with their paths; a visitor returning true stops it.
function walk(node, path, v) {
  if (isMap(node)) {
    for (const pair of node.items) {
      if (!isPair(pair)) continue;
      if (v.pair(pair, path)) return true;
      if (walk(pair.value, [...path, keyText(pair.key)], v)) return true;
    }
  } else if (isSeq(node)) {
    for (let i = 0; i < node.items.length; i++) {
      if (v.item(node.items[i], [...path, i])) return true;
      if (walk(node.items[i], [...path, i], v)) return true;
    }
  }
  return false;
}
