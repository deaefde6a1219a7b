import { getIn } from '../doc.js';
import { useForm } from './context.js';
import { ItemProblems } from './Fields.jsx';
import { moved } from './List.jsx';
import VmCard from './VmCard.jsx';
import './Vms.css';

// A free DNS-label name for a copy or a new VM.
function freeName(stem, taken) {
  for (let n = 1; ; n++) {
    const c = `${stem}${n}`.slice(0, 63);
    if (!taken.has(c)) return c;
  }
}

// What a duplicate must not share: a NIC's MAC and static IP are unique per module.
function copyOf(vm, taken) {
  const c = structuredClone(vm);
  c.name = freeName(`${vm.name || 'vm'}-copy`, taken);
  if (Array.isArray(c.nics)) c.nics = c.nics.map(({ mac, ip, ...n }) => n);
  return c;
}

// The VMs: one card each, collapsible (each card's state is kept by its index; `opened`
// holds it), with expand/collapse all and add.
export default function Vms({ opened, setOpened, problemsOf }) {
  const { doc, set, base } = useForm();
  const vp = [...base, 'vms'];
  const vms = Array.isArray(getIn(doc, vp)) ? getIn(doc, vp) : [];
  const subnets = (getIn(doc, [...base, 'network', 'subnets']) || []).map((s) => s?.name).filter(Boolean);
  const files = (getIn(doc, [...base, 'files']) || []).map((f) => f?.name).filter(Boolean);
  const taken = new Set(vms.map((v) => v?.name));
  const isOpen = (i) => opened(i, vms.length);
  // Card states follow their VMs when the list changes shape.
  const reopen = (order) => setOpened(Object.fromEntries(order.map((from, to) => [to, from == null ? true : isOpen(from)])));
  const all = vms.map((_, i) => i);
  const add = () => {
    set(vp, [...vms, { name: freeName('vm', taken), source: { bootstrap: { distro: 'debian', suite: 'bookworm', packages: [] } }, resources: { cpu: 1, memory: '1Gi' } }]);
    reopen([...all, null]);
  };
  const duplicate = (i) => {
    set(vp, [...vms.slice(0, i + 1), copyOf(vms[i] || {}, taken), ...vms.slice(i + 1)]);
    reopen([...all.slice(0, i + 1), null, ...all.slice(i + 1)]);
  };
  const remove = (i) => {
    set(vp, vms.filter((_, j) => j !== i));
    reopen(all.filter((j) => j !== i));
  };
  const move = (i, j) => {
    set(vp, moved(vms, i, j));
    reopen(moved(all, i, j));
  };
  const setAll = (on) => setOpened(Object.fromEntries(all.map((i) => [i, on])));
  return (
    <section className="form-section" aria-labelledby="form-vms" data-testid="vms">
      <div className="vms-head">
        <h2 id="form-vms">VMs <small>({vms.length})</small></h2>
        <button type="button" data-testid="vms-expand-all" onClick={() => setAll(true)}>Expand all</button>
        <button type="button" data-testid="vms-collapse-all" onClick={() => setAll(false)}>Collapse all</button>
      </div>
      <ItemProblems path={vp} />
      {vms.map((vm, i) => (
        <VmCard key={i} p={[...vp, i]} vm={vm && typeof vm === 'object' ? vm : {}} idx={i} count={vms.length}
          open={isOpen(i)} problems={problemsOf(i)} subnets={subnets} files={files}
          onToggle={() => setOpened((o) => ({ ...o, [i]: !isOpen(i) }))}
          onMove={(j) => move(i, j)} onDuplicate={() => duplicate(i)} onRemove={() => remove(i)} />
      ))}
      <button type="button" data-testid="vms-add" onClick={add}>+ VM</button>
    </section>
  );
}
