import { createContext, useContext } from 'react';
import { getIn, setIn, pathKey } from './doc.js';

// The form edits the JSON document at paths; each field shows the diagnostics that point at
// its path. Envelope manifests (kind/spec) are edited under `spec`.
const Ctx = createContext(null);

function useField(path) {
  const { doc, set, diags } = useContext(Ctx);
  const key = pathKey(path);
  const mine = diags.filter((d) => pathKey(d.path) === key);
  return { value: getIn(doc, path), set: (v) => set(path, v), mine, doc, setAt: set };
}

function Problems({ mine, path }) {
  if (!mine.length) return null;
  return (
    <div className="field-errors" data-testid={`error-${pathKey(path)}`}>
      {mine.map((d, i) => (
        <div key={i} className={d.severity}>{d.message}</div>
      ))}
    </div>
  );
}

// A text input: empty removes the key. `numeric` stores integers as numbers.
function Text({ label, path, numeric, placeholder, multiline }) {
  const { value, set, mine } = useField(path);
  const shown = value == null ? '' : typeof value === 'object' ? JSON.stringify(value) : String(value);
  const onChange = (e) => {
    const s = e.target.value;
    if (s === '') return set(undefined);
    if (numeric && /^-?\d+$/.test(s)) return set(Number(s));
    set(s);
  };
  const props = {
    'data-path': pathKey(path),
    className: mine.some((d) => d.severity === 'error') ? 'invalid' : '',
    value: shown,
    placeholder,
    onChange,
  };
  return (
    <label className="field">
      <span>{label}</span>
      {multiline ? <textarea rows={4} {...props} /> : <input {...props} />}
      <Problems mine={mine} path={path} />
    </label>
  );
}

function Check({ label, path, dflt }) {
  const { value, set, mine } = useField(path);
  return (
    <label className="field check">
      <input type="checkbox" data-path={pathKey(path)} checked={value == null ? !!dflt : !!value} onChange={(e) => set(e.target.checked)} />
      <span>{label}</span>
      <Problems mine={mine} path={path} />
    </label>
  );
}

function Select({ label, path, options, allowEmpty }) {
  const { value, set, mine } = useField(path);
  return (
    <label className="field">
      <span>{label}</span>
      <select data-path={pathKey(path)} value={value ?? ''} onChange={(e) => set(e.target.value === '' ? undefined : e.target.value)}>
        {allowEmpty && <option value="">(default)</option>}
        {value != null && !options.includes(value) && <option value={value}>{String(value)}</option>}
        {options.map((o) => <option key={o} value={o}>{o}</option>)}
      </select>
      <Problems mine={mine} path={path} />
    </label>
  );
}

// Diagnostics for a whole item (a missing required field points at its item).
function ItemProblems({ path }) {
  const { mine } = useField(path);
  return <Problems mine={mine} path={path} />;
}

function List({ title, path, make, render, testid, addLabel }) {
  const { value, set } = useField(path);
  const items = Array.isArray(value) ? value : [];
  const move = (i, j) => {
    const next = items.slice();
    [next[i], next[j]] = [next[j], next[i]];
    set(next);
  };
  return (
    <fieldset className="list" data-testid={testid}>
      <legend>{title}</legend>
      <ItemProblems path={path} />
      {items.map((item, i) => (
        <div className="item" key={i} data-testid={`${testid}-${i}`}>
          <div className="item-tools">
            <button title="up" disabled={i === 0} onClick={() => move(i, i - 1)}>↑</button>
            <button title="down" disabled={i === items.length - 1} onClick={() => move(i, i + 1)}>↓</button>
            <button title="remove" data-testid={`${testid}-${i}-remove`} onClick={() => set(items.length === 1 ? undefined : items.filter((_, j) => j !== i))}>✕</button>
          </div>
          <ItemProblems path={[...path, i]} />
          {render([...path, i], item, i)}
        </div>
      ))}
      <button data-testid={`${testid}-add`} onClick={() => set([...items, make(items)])}>{addLabel || '+ Add'}</button>
    </fieldset>
  );
}

export default function Form({ doc, diags, onChange }) {
  const base = doc.spec && typeof doc.spec === 'object' && (doc.kind || doc.apiVersion) ? ['spec'] : [];
  const set = (path, v) => onChange(setIn(doc, path, v));
  return (
    <Ctx.Provider value={{ doc, set, setAt: set, diags }}>
      <div className="form" data-testid="form">
        <ItemProblems path={[]} />
        <Files base={base} />
        <Network base={base} />
        <Vms base={base} />
      </div>
    </Ctx.Provider>
  );
}

function Files({ base }) {
  return (
    <section>
      <h2>Files</h2>
      <List title="files" testid="files" path={[...base, 'files']} make={() => ({ name: '', inline: '' })} addLabel="+ File"
        render={(p, f) => <FileItem p={p} f={f} />} />
    </section>
  );
}

function FileItem({ p, f }) {
  const { setAt } = useField(p);
  const kind = f && 'url' in f ? 'url' : 'inline';
  const switchKind = (k) => {
    const { inline, url, ...rest } = f || {};
    setAt(p, k === 'url' ? { ...rest, url: url ?? '' } : { ...rest, inline: inline ?? '' });
  };
  return (
    <div className="row">
      <Text label="name" path={[...p, 'name']} />
      <label className="field"><span>content</span>
        <select data-path={pathKey([...p, 'kind'])} value={kind} onChange={(e) => switchKind(e.target.value)}>
          <option value="inline">inline</option><option value="url">URL</option>
        </select>
      </label>
      {kind === 'url' ? <Text label="URL" path={[...p, 'url']} /> : <Text label="inline" multiline path={[...p, 'inline']} />}
    </div>
  );
}

function Network({ base }) {
  const { doc, setAt } = useContext(Ctx);
  const net = [...base, 'network'];
  const ovPath = [...base, 'buildOverrides', 'vpcs'];
  const vpcs = getIn(doc, [...net, 'vpcs']) || [];
  // "Build only": internet off in the base, on in a build override.
  const internetMode = (v) => {
    if (v?.internet === true) return 'always';
    const ov = (getIn(doc, ovPath) || []).find((o) => o?.name === v?.name);
    return ov?.internet === true ? 'build' : 'none';
  };
  const setInternet = (p, v, mode) => {
    let d = setIn(doc, [...p, 'internet'], mode === 'always');
    let ov = (getIn(d, ovPath) || []).filter((o) => o?.name !== v?.name);
    if (mode === 'build') ov = [...ov, { name: v?.name, internet: true }];
    d = setIn(d, ovPath, ov.length ? ov : undefined);
    if (!ov.length && getIn(d, [...base, 'buildOverrides']) && Object.keys(getIn(d, [...base, 'buildOverrides'])).length === 0) {
      d = setIn(d, [...base, 'buildOverrides'], undefined);
    }
    setAt([], d);
  };
  return (
    <section>
      <h2>Network</h2>
      <List title="VPCs" testid="vpcs" path={[...net, 'vpcs']} make={(xs) => ({ name: `vpc${xs.length + 1}`, internet: false })} addLabel="+ VPC"
        render={(p, v) => (
          <div className="row">
            <Text label="name" path={[...p, 'name']} />
            <label className="field"><span>Internet</span>
              <select data-path={pathKey([...p, 'internet'])} value={internetMode(v)} onChange={(e) => setInternet(p, v, e.target.value)}>
                <option value="none">None</option><option value="build">Build only</option><option value="always">Always</option>
              </select>
            </label>
          </div>
        )} />
      <List title="subnets" testid="subnets" path={[...net, 'subnets']} make={(xs) => ({ name: `subnet${xs.length + 1}`, cidr: `10.0.${xs.length + 1}.0/24` })} addLabel="+ Subnet"
        render={(p, s) => (
          <div className="row">
            <Text label="name" path={[...p, 'name']} />
            <Select label="VPC" path={[...p, 'vpc']} options={vpcs.map((v) => v?.name).filter(Boolean)} allowEmpty />
            <label className="field"><span>mode</span>
              <select data-path={pathKey([...p, 'unmanaged'])} value={s?.unmanaged === true ? 'unmanaged' : 'managed'}
                onChange={(e) => setAt([...p, 'unmanaged'], e.target.value === 'unmanaged' ? true : undefined)}>
                <option value="managed">Managed</option><option value="unmanaged">Unmanaged</option>
              </select>
            </label>
            <Text label="CIDR" path={[...p, 'cidr']} />
            <Check label="DHCP" path={[...p, 'dhcp']} dflt />
            <Text label="DNS" path={[...p, 'dns']} placeholder="8.8.8.8,1.1.1.1" />
          </div>
        )} />
    </section>
  );
}

function Vms({ base }) {
  return (
    <section>
      <h2>VMs</h2>
      <List title="VMs" testid="vms" path={[...base, 'vms']} addLabel="+ VM"
        make={(xs) => ({ name: `vm${xs.length + 1}`, source: { bootstrap: { distro: 'debian', suite: 'bookworm', packages: [] } }, resources: { cpu: 1, memory: '1Gi' } })}
        render={(p, vm) => <Vm p={p} vm={vm || {}} base={base} />} />
    </section>
  );
}

const SOURCES = {
  buildRef: { label: 'Existing Image', make: () => ({ buildRef: { name: '' } }) },
  blank: { label: 'ISO Install', make: () => ({ blank: true }) },
  url: { label: 'Disk Image URL', make: () => ({ url: '' }) },
  bootstrap: { label: 'Bootstrap (Debian)', make: () => ({ bootstrap: { distro: 'debian', suite: 'bookworm', packages: [] } }) },
  file: { label: 'Local disk file', make: () => ({ file: '' }) },
  containerDisk: { label: 'Container disk', make: () => ({ containerDisk: '' }) },
};

function Vm({ p, vm, base }) {
  const { doc, setAt } = useContext(Ctx);
  const src = vm.source && typeof vm.source === 'object' ? vm.source : {};
  const kind = Object.keys(SOURCES).find((k) => k in src) || '';
  const subnets = (getIn(doc, [...base, 'network', 'subnets']) || []).map((s) => s?.name).filter(Boolean);
  const files = (getIn(doc, [...base, 'files']) || []).map((f) => f?.name).filter(Boolean);
  const sp = [...p, 'source'];
  return (
    <div className="vm">
      <div className="row">
        <Text label="name" path={[...p, 'name']} />
      </div>
      <h3>Source</h3>
      <div className="row">
        <label className="field"><span>kind</span>
          <select data-path={pathKey(sp)} value={kind} onChange={(e) => setAt(sp, SOURCES[e.target.value].make())}>
            {!kind && <option value="">(none)</option>}
            {Object.entries(SOURCES).map(([k, s]) => <option key={k} value={k}>{s.label}</option>)}
          </select>
        </label>
        {kind === 'buildRef' && (<><Text label="module" path={[...sp, 'buildRef', 'name']} /><Text label="VM name" path={[...sp, 'buildRef', 'vmName']} /></>)}
        {kind === 'url' && (<><Text label="URL" path={[...sp, 'url']} /><Text label="checksum" path={[...sp, 'checksum']} placeholder="sha256:…" /></>)}
        {kind === 'file' && <Text label="path" path={[...sp, 'file']} />}
        {kind === 'containerDisk' && <Text label="image" path={[...sp, 'containerDisk']} />}
        {kind === 'bootstrap' && (<><Text label="distro" path={[...sp, 'bootstrap', 'distro']} /><Text label="suite" path={[...sp, 'bootstrap', 'suite']} />
          <Packages path={[...sp, 'bootstrap', 'packages']} /><Text label="mirror" path={[...sp, 'bootstrap', 'mirror']} /></>)}
      </div>
      {kind === 'blank' && (
        <>
          <List title="ISOs" testid={`isos-${p[p.length - 1]}`} path={[...p, 'isos']} make={() => ({ url: '' })} addLabel="+ ISO"
            render={(ip) => (<div className="row"><Text label="URL" path={[...ip, 'url']} /><Text label="checksum" path={[...ip, 'checksum']} /></div>)} />
          <BootCommand path={[...p, 'bootCommand']} />
        </>
      )}
      <h3>Resources</h3>
      <div className="row">
        <Text label="cpu" numeric path={[...p, 'resources', 'cpu']} />
        <Text label="memory" path={[...p, 'resources', 'memory']} placeholder="1Gi" />
      </div>
      <h3>Communicator</h3>
      <div className="row">
        <Select label="type" path={[...p, 'communicator', 'type']} options={['agent', 'ssh']} allowEmpty />
        <Select label="shell" path={[...p, 'communicator', 'shell']} options={['bash', 'powershell']} allowEmpty />
        <Text label="SSH user" path={[...p, 'communicator', 'sshUsername']} />
        <Text label="SSH password" path={[...p, 'communicator', 'sshPassword']} />
        <Text label="SSH port" numeric path={[...p, 'communicator', 'sshPort']} />
        <Text label="SSH timeout" path={[...p, 'communicator', 'sshTimeout']} />
      </div>
      <Nics p={p} vm={vm} subnets={subnets} />
      <Provisioners p={p} files={files} />
      <Delivery p={p} vm={vm} base={base} files={files} />
    </div>
  );
}

function Packages({ path }) {
  const { value, set, mine } = useField(path);
  const shown = Array.isArray(value) ? value.join(' ') : '';
  return (
    <label className="field"><span>packages</span>
      <input data-path={pathKey(path)} value={shown} onChange={(e) => set(e.target.value.split(/\s+/).filter(Boolean))} />
      <Problems mine={mine} path={path} />
    </label>
  );
}

function BootCommand({ path }) {
  const { value, set, mine } = useField(path);
  const { diags } = useContext(Ctx);
  const at = (i) => diags.filter((d) => pathKey(d.path) === pathKey([...path, i]));
  const shown = Array.isArray(value) ? value.join('\n') : '';
  return (
    <label className="field wide"><span>boot command (one string a line)</span>
      <textarea rows={4} data-path={pathKey(path)} value={shown} onChange={(e) => set(e.target.value === '' ? undefined : e.target.value.split('\n'))} />
      <Problems mine={mine} path={path} />
      {Array.isArray(value) && value.map((_, i) => <Problems key={i} mine={at(i)} path={[...path, i]} />)}
    </label>
  );
}

function Nics({ p, vm, subnets }) {
  const { setAt } = useContext(Ctx);
  const nics = Array.isArray(vm.nics) ? vm.nics : [];
  const used = new Set(nics.map((n) => n?.slot).filter((s) => s != null));
  const free = [1, 2, 3, 4, 5, 6, 7, 8, 9].find((s) => !used.has(s));
  return (
    <fieldset className="list" data-testid={`nics-${p[p.length - 1]}`}>
      <legend>Network interfaces</legend>
      <ItemProblems path={[...p, 'nics']} />
      {nics.map((n, i) => (
        <div className="item row" key={i}>
          <Text label="name" path={[...p, 'nics', i, 'name']} />
          <Select label="subnet" path={[...p, 'nics', i, 'subnet']} options={subnets} />
          <Text label="slot" numeric path={[...p, 'nics', i, 'slot']} />
          <Text label="IP" path={[...p, 'nics', i, 'ip']} />
          <Text label="MAC" path={[...p, 'nics', i, 'mac']} />
          <button title="remove" onClick={() => setAt([...p, 'nics'], nics.length === 1 ? undefined : nics.filter((_, j) => j !== i))}>✕</button>
        </div>
      ))}
      <button data-testid={`nics-${p[p.length - 1]}-add`} disabled={free == null}
        onClick={() => setAt([...p, 'nics'], [...nics, { name: `nic${free}`, subnet: subnets[0] || '', slot: free }])}>+ NIC</button>
    </fieldset>
  );
}

const STEP_TYPES = ['shell', 'file', 'reboot', 'windows-update', 'handbuild'];
const blockOf = (t) => (t === 'windows-update' ? 'windowsUpdate' : t);

function Provisioners({ p, files }) {
  const { doc, setAt } = useContext(Ctx);
  const setType = (sp, step, t) => {
    const next = { ...(step || {}) };
    for (const s of STEP_TYPES) delete next[blockOf(s)];
    next.type = t;
    next[blockOf(t)] = t === 'shell' ? { inline: '' } : t === 'file' ? { fileRef: files[0] || '', destination: '/' } : t === 'handbuild' ? { instructions: '' } : {};
    setAt(sp, next);
  };
  return (
    <List title="Provisioners" testid={`steps-${p[p.length - 1]}`} path={[...p, 'provisioners']} addLabel="+ Step"
      make={(xs) => ({ name: `step${xs.length + 1}`, type: 'shell', shell: { inline: '' } })}
      render={(sp, step) => (
        <div>
          <div className="row">
            <Text label="name" path={[...sp, 'name']} />
            <label className="field"><span>type</span>
              <select data-path={pathKey([...sp, 'type'])} value={step?.type ?? ''} onChange={(e) => setType(sp, step, e.target.value)}>
                {!STEP_TYPES.includes(step?.type) && <option value={step?.type ?? ''}>{String(step?.type ?? '')}</option>}
                {STEP_TYPES.map((t) => <option key={t} value={t}>{t}</option>)}
              </select>
            </label>
            <Text label="step timeout" path={[...sp, 'stepTimeout']} placeholder="30m" />
          </div>
          {step?.type === 'shell' && (<div className="row"><Text label="script" multiline path={[...sp, 'shell', 'inline']} /><Text label="execute command" path={[...sp, 'shell', 'executeCommand']} /></div>)}
          {step?.type === 'file' && (<div className="row"><Select label="file" path={[...sp, 'file', 'fileRef']} options={files} /><Text label="destination" path={[...sp, 'file', 'destination']} /></div>)}
          {step?.type === 'reboot' && (<div className="row"><Text label="command" path={[...sp, 'reboot', 'command']} /></div>)}
          {step?.type === 'handbuild' && (<div className="row"><Text label="instructions" multiline path={[...sp, 'handbuild', 'instructions']} /></div>)}
          {step?.type === 'windows-update' && (<div className="row"><Text label="search criteria" path={[...sp, 'windowsUpdate', 'searchCriteria']} /><Text label="update limit" numeric path={[...sp, 'windowsUpdate', 'updateLimit']} /></div>)}
        </div>
      )} />
  );
}

// Which files reach this VM: over HTTP (the manifest-wide httpDirectory) and on its floppy.
function Delivery({ p, vm, base, files }) {
  const { doc, setAt } = useContext(Ctx);
  if (!files.length) return null;
  const httpPath = [...base, 'httpDirectory', 'files'];
  const http = new Set((getIn(doc, httpPath) || []).map((f) => f?.name));
  const floppy = new Set((getIn(vm, ['floppy', 'files']) || []).map((f) => f?.name));
  const toggle = (path, list, name, on) => {
    const cur = (getIn(doc, path) || []).filter((f) => f?.name !== name);
    const next = on ? [...cur, { name }] : cur;
    let d = setIn(doc, path, next.length ? next : undefined);
    const parent = path.slice(0, -1);
    const obj = getIn(d, parent);
    if (obj && typeof obj === 'object' && Object.keys(obj).length === 0) d = setIn(d, parent, undefined);
    setAt([], d);
  };
  return (
    <table className="matrix" data-testid={`delivery-${p[p.length - 1]}`}>
      <thead><tr><th>file</th><th>HTTP</th><th>floppy</th></tr></thead>
      <tbody>
        {files.map((f) => (
          <tr key={f}>
            <td>{f}</td>
            <td><input type="checkbox" checked={http.has(f)} onChange={(e) => toggle(httpPath, http, f, e.target.checked)} /></td>
            <td><input type="checkbox" checked={floppy.has(f)} onChange={(e) => toggle([...p, 'floppy', 'files'], floppy, f, e.target.checked)} /></td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
