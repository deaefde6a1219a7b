import { pathKey } from '../doc.js';
import { useForm } from './context.js';
import { enumAt } from './schema.js';
import { Text, Select, Lines } from './Fields.jsx';
import List from './List.jsx';

// Without the schema (an older server), the step types kiln knows.
const KNOWN_TYPES = ['shell', 'file', 'reboot', 'windows-update', 'handbuild'];
// The block that holds a type's fields (`windows-update` keeps them under `windowsUpdate`).
const blockOf = (t) => (t === 'windows-update' ? 'windowsUpdate' : t);

function fresh(t, files) {
  if (t === 'shell') return { inline: '' };
  if (t === 'file') return { fileRef: files[0] || '', destination: '/' };
  if (t === 'handbuild') return { instructions: '' };
  return {};
}

// The VM's steps, run in order after boot: reordered with the buttons (keyboard) or by
// dragging, added by type; each shows the fields of its type.
export default function Provisioners({ p, idx, files }) {
  const { set, schema } = useForm();
  const types = enumAt(schema, ['vms', 0, 'provisioners', 0, 'type']) || KNOWN_TYPES;
  const setType = (sp, step, t) => {
    const next = { ...(step || {}) };
    for (const s of types) delete next[blockOf(s)];
    next.type = t;
    next[blockOf(t)] = fresh(t, files);
    set(sp, next);
  };
  return (
    <List title="steps, in order" testid={`steps-${idx}`} path={[...p, 'provisioners']} draggable
      itemName={(s, i) => `step ${i + 1}${s?.name ? ` (${s.name})` : ''}`}
      adds={types.map((t) => ({
        label: `+ ${t}`,
        testid: `steps-${idx}-add-${t}`,
        make: (xs) => ({ name: `step${xs.length + 1}`, type: t, [blockOf(t)]: fresh(t, files) }),
      }))}
      render={(sp, step, i) => (
        <div>
          <div className="row">
            <span className="step-number" aria-hidden="true">{i + 1}</span>
            <Text label="name" path={[...sp, 'name']} />
            <label className="field"><span className="label">type</span>
              <select data-path={pathKey([...sp, 'type'])} value={step?.type ?? ''} onChange={(e) => setType(sp, step, e.target.value)}>
                {!types.includes(step?.type) && <option value={step?.type ?? ''}>{String(step?.type ?? '')}</option>}
                {types.map((t) => <option key={t} value={t}>{t}</option>)}
              </select>
            </label>
            <Text label="step timeout" path={[...sp, 'stepTimeout']} placeholder="build timeout" />
          </div>
          <StepFields sp={sp} step={step} files={files} />
        </div>
      )} />
  );
}

function StepFields({ sp, step, files }) {
  switch (step?.type) {
    case 'shell':
      return (
        <div className="row">
          <Text label="script" multiline path={[...sp, 'shell', 'inline']} />
          <Text label="execute command" path={[...sp, 'shell', 'executeCommand']} placeholder="sudo -S sh -c '{{ .Command }}'" />
          <Text label="script from file" path={[...sp, 'shell', 'scriptFrom', 'configMapRef', 'name']} />
          {/* A mapping `env` is edited in the YAML tab: a line being typed is no key=value yet. */}
          {step.shell?.env != null && !Array.isArray(step.shell.env)
            ? <p className="section-note">environment: a mapping, edited in the YAML tab</p>
            : <Lines label="environment (NAME=value a line)" path={[...sp, 'shell', 'env']} />}
        </div>
      );
    case 'file':
      return <FileStep sp={sp} step={step} files={files} />;
    case 'reboot':
      return <div className="row"><Text label="command" path={[...sp, 'reboot', 'command']} placeholder="reboot" /></div>;
    case 'handbuild':
      return <div className="row"><Text label="instructions" multiline path={[...sp, 'handbuild', 'instructions']} /></div>;
    case 'windows-update':
      return (
        <div className="row">
          <Text label="search criteria" path={[...sp, 'windowsUpdate', 'searchCriteria']} />
          <Text label="update limit" numeric path={[...sp, 'windowsUpdate', 'updateLimit']} />
        </div>
      );
    default:
      return null;
  }
}

// A file step uploads a `files` entry (`fileRef`) or a local file (`source`, a ConfigMap or
// Secret reference read as a path).
function FileStep({ sp, step, files }) {
  const { set } = useForm();
  const block = step.file && typeof step.file === 'object' ? step.file : {};
  const local = 'source' in block && !('fileRef' in block);
  const ref = block.source && typeof block.source === 'object' && 'secretRef' in block.source ? 'secretRef' : 'configMapRef';
  const from = (v) => {
    const { fileRef, source, ...rest } = block;
    set([...sp, 'file'], v === 'local' ? { ...rest, source: source ?? { configMapRef: { name: '' } } } : { ...rest, fileRef: fileRef ?? (files[0] || '') });
  };
  return (
    <div className="row">
      <label className="field"><span className="label">from</span>
        <select data-path={pathKey([...sp, 'file', 'from'])} value={local ? 'local' : 'files'} onChange={(e) => from(e.target.value)}>
          <option value="files">a Files entry</option><option value="local">a local file</option>
        </select>
      </label>
      {local
        ? <Text label="local path (relative to the manifest)" path={[...sp, 'file', 'source', ref, 'name']} />
        : <Select label="file" path={[...sp, 'file', 'fileRef']} options={files} allowEmpty />}
      <Text label="destination" path={[...sp, 'file', 'destination']} placeholder="/etc/motd" />
    </div>
  );
}
