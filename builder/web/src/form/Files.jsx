import { pathKey } from '../doc.js';
import { useForm } from './context.js';
import { Text, Check } from './Fields.jsx';
import List from './List.jsx';
import { listed, toggleListed } from './delivery.js';

// The manifest's named files: inline or from a URL; each may be served over HTTP to the
// build's VMs (`httpDirectory`), put on a VM's floppy or uploaded by a file step.
export default function Files() {
  const { base } = useForm();
  return (
    <section className="form-section" aria-labelledby="form-files">
      <h2 id="form-files">Files</h2>
      <List title="files" testid="files" path={[...base, 'files']} itemName={(f, i) => f?.name || `file ${i + 1}`}
        adds={[{ label: '+ File', testid: 'files-add', make: () => ({ name: '', inline: '' }) }]}
        render={(p, f) => <FileItem p={p} f={f} />} />
    </section>
  );
}

function FileItem({ p, f }) {
  const { doc, set, base } = useForm();
  const kind = f && 'url' in f ? 'url' : 'inline';
  const httpPath = [...base, 'httpDirectory', 'files'];
  const switchKind = (k) => {
    const { inline, url, ...rest } = f || {};
    set(p, k === 'url' ? { ...rest, url: url ?? '' } : { ...rest, inline: inline ?? '' });
  };
  return (
    <div className="row">
      <Text label="name" path={[...p, 'name']} />
      <label className="field"><span className="label">content</span>
        <select data-path={pathKey([...p, 'kind'])} value={kind} onChange={(e) => switchKind(e.target.value)}>
          <option value="inline">inline</option><option value="url">URL</option>
        </select>
      </label>
      {f?.name && (
        <Check label="served over HTTP" path={[...p, 'http']} dflt={listed(doc, httpPath).has(f.name)}
          onToggle={(on) => set([], toggleListed(doc, httpPath, f.name, on))} />
      )}
      {kind === 'url' ? <Text label="URL" wide path={[...p, 'url']} /> : <Text label="inline" multiline path={[...p, 'inline']} />}
    </div>
  );
}
