import { useCallback, useMemo, useRef, useState } from 'react';
import { setIn, pathKey } from './doc.js';
import { FormCtx } from './form/context.js';
import { useSchema, describe } from './form/schema.js';
import { ItemProblems } from './form/Fields.jsx';
import ProblemList from './form/ProblemList.jsx';
import BuildSettings from './form/BuildSettings.jsx';
import Files from './form/Files.jsx';
import Network from './form/Network.jsx';
import Vms from './form/Vms.jsx';
import './Form.css';

const NONE = [];
// Cards start open in a small manifest and closed in a big one (20 VMs stay one screen).
const OPEN_BY_DEFAULT_UP_TO = 3;

// The Visual editor: the manifest laid out as the guide's sections (Files, Network, each VM
// with Source, Resources, Communicator, Network Interfaces, Provisioners). It edits the JSON
// document at paths and hands every new document to `onChange`; each field shows the
// diagnostics that name its path. Envelope manifests (kind/spec) are edited under `spec`.
export default function Form({ doc, diags, onChange }) {
  const base = useMemo(() => (doc.spec && typeof doc.spec === 'object' && (doc.kind || doc.apiVersion) ? ['spec'] : []), [doc]);
  const schema = useSchema();
  const [openState, setOpened] = useState({});
  const root = useRef(null);

  const byPath = useMemo(() => {
    const m = new Map();
    for (const d of diags) {
      const k = pathKey(d.path || []);
      m.set(k, [...(m.get(k) || []), d]);
    }
    return m;
  }, [diags]);
  const help = useMemo(() => new Map(), [schema]);
  const ctx = useMemo(() => ({
    doc,
    base,
    schema,
    diags,
    set: (path, v) => onChange(setIn(doc, path, v)),
    diagsAt: (key) => byPath.get(key) || NONE,
    helpAt: (path) => {
      // Help is per field, not per list item: `vms.3.name` reads as `vms.0.name`.
      const k = path.map((s) => (typeof s === 'number' ? 0 : s)).join('.');
      if (!help.has(k)) help.set(k, describe(schema, path));
      return help.get(k);
    },
  }), [doc, base, schema, diags, byPath, help, onChange]);

  const vmsPath = pathKey([...base, 'vms']);
  const opened = useCallback((i, n) => openState[i] ?? n <= OPEN_BY_DEFAULT_UP_TO, [openState]);
  // Errors and warnings inside each VM, for its card's summary.
  const problemsOf = useCallback((i) => {
    const prefix = `${vmsPath}.${i}`;
    const list = diags.filter((d) => {
      const k = pathKey(d.path || []);
      return k === prefix || k.startsWith(prefix + '.');
    });
    const errors = list.filter((d) => d.severity === 'error').length;
    return { errors, warnings: list.length - errors, list };
  }, [diags, vmsPath]);

  // Bring a diagnostic's field into view and focus it: open its VM's card, then focus the
  // deepest element of the form whose path is a prefix of the diagnostic's.
  const goTo = (d) => {
    const path = d.path || [];
    const n = base.length;
    if (path[n] === 'vms' && typeof path[n + 1] === 'number') setOpened((o) => ({ ...o, [path[n + 1]]: true }));
    requestAnimationFrame(() => requestAnimationFrame(() => {
      for (let k = path.length; k >= 0; k--) {
        const key = pathKey(path.slice(0, k));
        const el = root.current?.querySelector(`[data-path="${CSS.escape(key)}"]`);
        if (!el) continue;
        const target = el.matches('input, select, textarea, button') ? el : el.querySelector('input:checked, input, select, textarea, button') || el;
        // A field in a closed <details> (the boot extras) cannot take focus: open it.
        for (let det = target.closest('details'); det; det = det.parentElement?.closest('details')) det.open = true;
        target.scrollIntoView({ block: 'center' });
        target.focus({ preventScroll: true });
        return;
      }
    }));
  };

  return (
    <FormCtx.Provider value={ctx}>
      <div className="form" data-testid="form" ref={root} data-help={schema ? '1' : '0'}>
        <ProblemList diags={diags} goTo={goTo} />
        <ItemProblems path={[]} />
        <BuildSettings />
        <Files />
        <Network />
        <Vms opened={opened} setOpened={setOpened} problemsOf={problemsOf} />
      </div>
    </FormCtx.Provider>
  );
}
