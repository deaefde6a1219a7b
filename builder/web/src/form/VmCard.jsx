import { useLayoutEffect, useRef, useState } from 'react';
import { pathKey } from '../doc.js';
import { Text, Problems } from './Fields.jsx';
import Source, { SOURCES, sourceKind } from './Source.jsx';
import Resources from './Resources.jsx';
import Communicator from './Communicator.jsx';
import Nics from './Nics.jsx';
import Provisioners from './Provisioners.jsx';
import FileDelivery from './FileDelivery.jsx';
import Boot from './Boot.jsx';
import './VmCard.css';

// kiln's boot extras: their subsection starts open when the VM sets any of them.
const BOOT_FIELDS = ['boot', 'efiFirmware', 'invisible', 'bootCommand', 'bootWait', 'bootKeyInterval', 'cloudInit'];

// The one-line summary of a VM: source kind, cpu/memory, steps.
function summary(vm, kind) {
  const r = vm.resources && typeof vm.resources === 'object' ? vm.resources : {};
  const steps = Array.isArray(vm.provisioners) ? vm.provisioners.length : 0;
  return [
    SOURCES[kind]?.label || 'no source',
    `${r.cpu ?? '?'} cpu`,
    `${r.memory ?? '?'} memory`,
    `${steps} step${steps === 1 ? '' : 's'}`,
  ].join(' · ');
}

// One VM as a card: a header that collapses it (with its summary and problem counts) and,
// open, the guide's subsections plus kiln's boot extras.
export default function VmCard({ p, vm, idx, count, open, problems, subnets, files, onToggle, onMove, onDuplicate, onRemove }) {
  const kind = sourceKind(vm);
  const name = vm.name || `VM ${idx + 1}`;
  const bodyId = `vm-body-${idx}`;
  const [bootOpen, setBootOpen] = useState(() => BOOT_FIELDS.some((k) => k in vm));
  const body = useRef(null);
  const unplaced = useUnplaced(body, open, problems.list);
  return (
    <article className={`form-vm${open ? ' open' : ''}`} data-testid={`vm-${idx}`} data-open={open ? '1' : '0'}
      data-path={pathKey(p)} tabIndex={-1} aria-label={`VM ${name}`}>
      <div className="vm-head">
        <button type="button" className="vm-toggle" aria-expanded={open} aria-controls={bodyId} data-testid={`vm-${idx}-toggle`} onClick={onToggle}>
          <span className="chevron" aria-hidden="true">{open ? '▾' : '▸'}</span>
          <span className="vm-name">{vm.name || '(unnamed)'}</span>
          <span className="vm-summary" data-testid={`vm-${idx}-summary`}>{summary(vm, kind)}</span>
          {problems.errors > 0 && <span className="vm-count bad" data-testid={`vm-${idx}-errors`}>{problems.errors} error{problems.errors === 1 ? '' : 's'}</span>}
          {problems.warnings > 0 && <span className="vm-count warn">{problems.warnings} warning{problems.warnings === 1 ? '' : 's'}</span>}
        </button>
        <div className="vm-actions">
          <button type="button" aria-label={`move ${name} up`} title="move up" disabled={idx === 0} onClick={() => onMove(idx - 1)}>↑</button>
          <button type="button" aria-label={`move ${name} down`} title="move down" disabled={idx === count - 1} onClick={() => onMove(idx + 1)}>↓</button>
          <button type="button" data-testid={`vm-${idx}-duplicate`} onClick={onDuplicate}>Duplicate</button>
          <button type="button" data-testid={`vm-${idx}-remove`} aria-label={`remove ${name}`} disabled={count === 1} onClick={onRemove}>Remove</button>
        </div>
      </div>
      {open && (
        <div className="vm-body" id={bodyId} ref={body}>
          {unplaced.length > 0 && (
            <div className="vm-unplaced" data-testid={`vm-${idx}-unplaced`}><Problems mine={unplaced} path={[...p, 'other']} /></div>
          )}
          <div className="row"><Text label="name" path={[...p, 'name']} /></div>
          <Sub title="Source" idx={idx} id="source"><Source p={p} vm={vm} idx={idx} /></Sub>
          {kind === 'blank' && <Sub title="File Delivery" idx={idx} id="delivery"><FileDelivery p={p} vm={vm} idx={idx} /></Sub>}
          <Sub title="Resources" idx={idx} id="resources"><Resources p={p} idx={idx} /></Sub>
          <Sub title="Communicator" idx={idx} id="communicator"><Communicator p={p} vm={vm} /></Sub>
          <Sub title="Network Interfaces" idx={idx} id="nics"><Nics p={p} vm={vm} idx={idx} subnets={subnets} /></Sub>
          <Sub title="Provisioners" idx={idx} id="provisioners"><Provisioners p={p} idx={idx} files={files} /></Sub>
          <details className="vm-sub" data-testid={`vm-${idx}-boot`} open={bootOpen}
            onToggle={(e) => setBootOpen(e.currentTarget.open)}>
            <summary><h3>Boot and firmware</h3></summary>
            <Boot p={p} vm={vm} kind={kind} />
          </details>
        </div>
      )}
    </article>
  );
}

function Sub({ title, idx, id, children }) {
  const hid = `vm-${idx}-${id}`;
  return (
    <section className="vm-sub" aria-labelledby={hid} data-testid={hid}>
      <h3 id={hid}>{title}</h3>
      {children}
    </section>
  );
}

// The VM's diagnostics that no field of the open card shows (a field of another source kind,
// a key the form has no field for): listed at the card's top so none is lost.
function useUnplaced(body, open, list) {
  const [unplaced, setUnplaced] = useState([]);
  const sig = list.map((d) => `${pathKey(d.path || [])}\n${d.message}`).join('\n');
  useLayoutEffect(() => {
    const el = body.current;
    const next = open && el
      ? list.filter((d) => !el.querySelector(`[data-testid="error-${CSS.escape(pathKey(d.path || []))}"]`))
      : [];
    setUnplaced((cur) => (cur.length === next.length && cur.every((d, i) => d === next[i]) ? cur : next));
    // `sig` stands for `list`, which is a new array at every render.
  }, [open, sig]);
  return unplaced;
}
