// Completion and hover help for the YAML editor, from the manifest's JSON Schema: the keys a
// mapping may hold at the cursor (with their descriptions), the values an enum field takes,
// and a key's description and type under the pointer.
import { completionContext, keyAt } from './cursor.js';
import { keysAt, valuesAt, keyInfo } from './schema.js';

// `schema` is a ref ({current}) filled once /api/schema has answered.
export function completionSource(schema) {
  return (context) => {
    const root = schema.current;
    if (!root) return null;
    const text = context.state.doc.toString();
    const at = completionContext(text, context.pos);
    if (!at || (!at.word && !context.explicit)) return null;
    const options = [];
    if (at.keys) {
      for (const k of keysAt(root, at.keys.path)) {
        if (at.keys.siblings.includes(k.name)) continue;
        options.push({
          label: k.name,
          type: 'property',
          detail: k.type,
          info: k.description || undefined,
          apply: `${k.name}: `,
          boost: k.required ? 1 : 0,
        });
      }
    }
    if (at.value) {
      for (const v of valuesAt(root, at.value.path)) {
        options.push({ label: String(v), type: typeof v === 'boolean' ? 'keyword' : 'enum' });
      }
    }
    if (!options.length) return null;
    return { from: at.from, to: at.to, options, validFor: /^[\w.\-/]*$/ };
  };
}

// A hover tooltip source (for @codemirror/view's hoverTooltip) on keys.
export function hoverSource(schema) {
  return (view, pos) => {
    const root = schema.current;
    if (!root) return null;
    const at = keyAt(view.state.doc.toString(), pos);
    if (!at) return null;
    const info = keyInfo(root, at.path);
    if (!info) return null;
    return {
      pos: at.from,
      end: at.to,
      above: true,
      create() {
        const dom = document.createElement('div');
        dom.className = 'yaml-hover';
        dom.dataset.testid = 'yaml-hover';
        const head = document.createElement('div');
        const key = document.createElement('strong');
        key.textContent = at.path[at.path.length - 1];
        head.append(key);
        if (info.type) {
          const type = document.createElement('code');
          type.textContent = info.type;
          head.append(' ', type);
        }
        dom.append(head);
        if (info.description) {
          const p = document.createElement('p');
          p.textContent = info.description;
          dom.append(p);
        }
        return { dom };
      },
    };
  };
}
