import { useRef } from 'react';
import { pathKey } from '../doc.js';
import { useForm } from './context.js';
import { Text, Check, Select, Words, ItemProblems } from './Fields.jsx';
import List from './List.jsx';
import './Source.css';

// The source kinds in the guide's order, then kiln's own. `containerDisk` (refused by kiln) is
// offered only to a VM that already has it, so the form still shows what the YAML says.
export const SOURCES = {
  buildRef: { label: 'Existing Image', key: 'buildRef', make: () => ({ buildRef: { name: '' } }) },
  blank: { label: 'ISO Install', key: 'blank + isos', make: () => ({ blank: true }) },
  url: { label: 'Disk Image URL', key: 'url', make: () => ({ url: '' }) },
  bootstrap: { label: 'Bootstrap', key: 'kiln: debian packages', make: () => ({ bootstrap: { distro: 'debian', suite: 'bookworm', packages: [] } }) },
  file: { label: 'File', key: 'kiln: local disk image', make: () => ({ file: '' }) },
  containerDisk: { label: 'Container disk', key: 'not supported', make: () => ({ containerDisk: '' }) },
};

export const sourceKind = (vm) => {
  const src = vm?.source && typeof vm.source === 'object' ? vm.source : {};
  return Object.keys(SOURCES).find((k) => k in src) || '';
};

// The VM fields that belong to an ISO install: they leave with it and come back with it.
const INSTALL_MEDIA = ['isos', 'floppy'];

export default function Source({ p, vm, idx }) {
  const { set } = useForm();
  const kind = sourceKind(vm);
  const sp = [...p, 'source'];
  // What each kind held before a switch, so switching back restores it (while the card is open).
  const kept = useRef({});
  const pick = (k) => {
    if (k === kind) return;
    const next = { ...vm };
    kept.current[kind] = { source: vm.source, ...Object.fromEntries(INSTALL_MEDIA.map((f) => [f, vm[f]])) };
    const back = kept.current[k];
    next.source = back?.source ?? SOURCES[k].make();
    if (kind === 'blank') for (const f of INSTALL_MEDIA) delete next[f];
    if (k === 'blank' && back) for (const f of INSTALL_MEDIA) if (back[f] !== undefined) next[f] = back[f];
    set(p, next);
  };
  const offered = Object.keys(SOURCES).filter((k) => k !== 'containerDisk' || kind === 'containerDisk');
  return (
    <div className="vm-source">
      <ItemProblems path={sp} />
      <div className="source-kinds" role="radiogroup" aria-label={`source of ${vm.name || `VM ${idx + 1}`}`} data-path={pathKey(sp)}
        data-testid={`source-${idx}`} data-kind={kind}>
        {offered.map((k) => (
          <label key={k} className={`source-kind${k === kind ? ' on' : ''}`}>
            <input type="radio" name={`source-${idx}`} value={k} checked={k === kind} data-testid={`source-${idx}-${k}`}
              onChange={() => pick(k)} />
            <span className="source-label">{SOURCES[k].label}</span>
            <small>{SOURCES[k].key}</small>
          </label>
        ))}
      </div>
      <div className="row">
        {kind === 'buildRef' && (<><Text label="module" path={[...sp, 'buildRef', 'name']} /><Text label="VM name" path={[...sp, 'buildRef', 'vmName']} /></>)}
        {kind === 'url' && (<><Text label="image URL" wide path={[...sp, 'url']} /><Text label="checksum" path={[...sp, 'checksum']} placeholder="sha256:…" /></>)}
        {kind === 'file' && <Text label="path (relative to the manifest)" path={[...sp, 'file']} />}
        {kind === 'containerDisk' && <Text label="image" path={[...sp, 'containerDisk']} />}
        {kind === 'bootstrap' && (
          <>
            <Select label="distro" path={[...sp, 'bootstrap', 'distro']} options={['debian']} />
            <Text label="suite" path={[...sp, 'bootstrap', 'suite']} placeholder="bookworm" />
            <Words label="packages" path={[...sp, 'bootstrap', 'packages']} />
            <Text label="kernel" path={[...sp, 'bootstrap', 'kernel']} placeholder="linux-image-cloud-amd64" />
            <Text label="mirror" path={[...sp, 'bootstrap', 'mirror']} />
          </>
        )}
        {(kind === 'url' || kind === 'file') && (
          <Check label="cloud-init seed (kiln installs its agent through it)" path={[...p, 'cloudInit']}
            onToggle={(on) => set([...p, 'cloudInit'], on ? (vm.cloudInit ?? {}) : undefined)} />
        )}
      </div>
      {kind === 'blank' && (
        <>
          <p className="section-note">
            An installer boots from the ISOs onto the blank disk; the build then reaches the installed system over SSH (Communicator).{' '}
            {vm.communicator?.type !== 'ssh' && (
              <button type="button" data-testid={`source-${idx}-use-ssh`}
                onClick={() => set([...p, 'communicator', 'type'], 'ssh')}>Reach it over SSH</button>
            )}
          </p>
          <List title="ISOs" testid={`isos-${idx}`} path={[...p, 'isos']} itemName={(_, i) => `ISO ${i + 1}`}
            adds={[{ label: '+ ISO', testid: `isos-${idx}-add`, make: () => ({ url: '' }) }]}
            render={(ip) => (<div className="row"><Text label="URL" wide path={[...ip, 'url']} /><Text label="checksum" path={[...ip, 'checksum']} /></div>)} />
        </>
      )}
    </div>
  );
}
