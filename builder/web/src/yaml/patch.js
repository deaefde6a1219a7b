// Applies a changed manifest document to its YAML text in place, so that what the Visual
// editor did not touch keeps its comments, key order, blank lines and styles: the text is
// parsed with the `yaml` package's Document (comments attached to nodes), only the changed
// values are set, added or deleted, and the document is written back.
import { parseDocument, isMap, isSeq, isScalar, isPair, isNode } from 'yaml';

const WRITE = { lineWidth: 0, minContentWidth: 0 };

// The text of `next` written over `text`, or null when that cannot be done faithfully (the
// text does not parse here, or the result would not read back as `next`): the caller then
// falls back to the server's canonical writer.
export function patchYaml(text, next) {
  const doc = parseDocument(text, { prettyErrors: false });
  if (doc.errors.length) return null;
  const old = doc.toJS({ maxAliasCount: -1 });
  if (equal(old, next)) return text;
  doc.contents = patch(doc, doc.contents, old, next);
  const out = write(doc, text);
  const back = parseDocument(out);
  if (back.errors.length || !equal(back.toJS({ maxAliasCount: -1 }), next)) return null;
  return out;
}

// The writer always puts a blank line before the document's closing comment; the comment is
// written here instead when the original text had none there.
function write(doc, text) {
  const closing = doc.comment;
  if (!closing || /\n[ \t]*\n(?:[ \t]*#.*\n?)+\s*$/.test(text)) return doc.toString(WRITE);
  doc.comment = null;
  const body = doc.toString(WRITE);
  doc.comment = closing;
  return `${body}${closing.replace(/^(?!$)(?: $)?/gm, '#')}\n`;
}

function patch(doc, node, old, next) {
  if (equal(old, next)) return node;
  if (isMap(node) && isObject(next) && isObject(old)) {
    for (const pair of [...node.items]) {
      if (!isPair(pair)) continue;
      const k = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
      if (!Object.hasOwn(next, k)) node.items.splice(node.items.indexOf(pair), 1);
      else pair.value = patch(doc, pair.value, old[k], next[k]);
    }
    for (const k of Object.keys(next)) {
      if (!Object.hasOwn(old, k)) node.items.push(doc.createPair(k, next[k]));
    }
    return node;
  }
  if (isSeq(node) && Array.isArray(next) && Array.isArray(old)) {
    node.items = patchList(doc, node.items, old, next);
    return node;
  }
  if (isScalar(node) && !isObject(next) && !Array.isArray(next) && next !== null) {
    // A string turning multi-line (or back) takes the writer's style for it: a block
    // literal for a script rather than a quoted line full of \n.
    const lines = (v) => typeof v === 'string' && v.includes('\n');
    if (lines(old) !== lines(next)) delete node.type;
    node.value = next;
    // A number written as hex or with set decimals would misstate the new value.
    delete node.format;
    delete node.minFractionDigits;
    return node;
  }
  // The kind changed (a scalar became a mapping, ...): a new node, keeping the old one's comments.
  const fresh = doc.createNode(next);
  if (isNode(node) && isNode(fresh)) {
    fresh.commentBefore = node.commentBefore;
    fresh.comment = node.comment;
    fresh.spaceBefore = node.spaceBefore;
  }
  return fresh;
}

// List items: the unchanged ones are kept (matched by a longest common subsequence, so an
// insertion or a removal does not shift comments onto other items); a changed or moved item
// is patched from the old item of the same `name` (VMs, steps, files...) wherever it was, so it
// keeps its comments and key order; else from the next unused old one in its gap; the rest are
// dropped or created.
function patchList(doc, items, old, next) {
  const n = old.length;
  const m = next.length;
  const lcs = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = equal(old[i], next[j]) ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  // Old items already placed (kept in order, or patched into a new place).
  const taken = new Set();
  const byName = (name, prefer) => {
    const fits = (o) => !taken.has(o) && nameOf(old[o]) !== undefined && nameOf(old[o]) === name;
    return prefer.find(fits) ?? [...old.keys()].find(fits);
  };
  const out = [];
  let i = 0;
  let j = 0;
  let gapOld = [];
  let gapNew = [];
  const flush = () => {
    const from = new Map();
    for (const jj of gapNew) {
      const name = nameOf(next[jj]);
      if (name === undefined) continue;
      const ii = byName(name, gapOld);
      if (ii !== undefined) { from.set(jj, ii); taken.add(ii); }
    }
    for (const jj of gapNew) {
      if (from.has(jj) || nameOf(next[jj]) !== undefined) continue;
      const ii = gapOld.find((o) => !taken.has(o) && nameOf(old[o]) === undefined);
      if (ii !== undefined) { from.set(jj, ii); taken.add(ii); }
    }
    for (const jj of gapNew) {
      const ii = from.get(jj);
      out.push(ii === undefined ? doc.createNode(next[jj]) : patch(doc, items[ii], old[ii], next[jj]));
    }
    gapOld = [];
    gapNew = [];
  };
  while (i < n || j < m) {
    if (i < n && j < m && !taken.has(i) && equal(old[i], next[j]) && lcs[i][j] === lcs[i + 1][j + 1] + 1) {
      flush();
      // The gap's flush may have taken this item for a moved one of the same name.
      if (taken.has(i)) {
        gapNew.push(j++);
        i++;
        continue;
      }
      taken.add(i);
      out.push(items[i]);
      i++;
      j++;
    } else if (j < m && (i >= n || lcs[i][j + 1] >= lcs[i + 1][j])) {
      gapNew.push(j++);
    } else {
      gapOld.push(i++);
    }
  }
  flush();
  return out;
}

const nameOf = (v) => (isObject(v) && typeof v.name === 'string' ? v.name : undefined);

const isObject = (v) => v != null && typeof v === 'object' && !Array.isArray(v);

export function equal(a, b) {
  if (a === b) return true;
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((x, i) => equal(x, b[i]));
  if (isObject(a) && isObject(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => Object.hasOwn(b, k) && equal(a[k], b[k]));
  }
  return false;
}
