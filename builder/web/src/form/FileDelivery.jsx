import { useForm } from './context.js';
import { getIn } from '../doc.js';
import { listed, toggleListed } from './delivery.js';
import './FileDelivery.css';

// A 1.44 MB floppy, less what FAT12 itself takes (about 17 KiB): what the inline files may fill.
const FLOPPY_BYTES = 1440 * 1024 - 17 * 1024;

// How each of the manifest's files reaches this VM's installer: on the VM's floppy
// (`floppy.files`) or over HTTP from the gateway (`httpDirectory`, shared by every VM of the
// build). kiln makes no CD from files (Packer's cd_files), so there is no CD column.
export default function FileDelivery({ p, vm, idx }) {
  const { doc, set, base } = useForm();
  const files = (getIn(doc, [...base, 'files']) || []).filter((f) => f?.name);
  const httpPath = [...base, 'httpDirectory', 'files'];
  const floppyPath = [...p, 'floppy', 'files'];
  const http = listed(doc, httpPath);
  const floppy = listed(doc, floppyPath);
  const onFloppy = files.filter((f) => floppy.has(f.name));
  const floppyBytes = onFloppy.reduce((n, f) => n + (typeof f.inline === 'string' ? new Blob([f.inline]).size : 0), 0);
  const toggle = (path, name, on) => set([], toggleListed(doc, path, name, on));
  const vmName = vm.name || `VM ${idx + 1}`;
  if (!files.length) {
    return <p className="section-note" data-testid={`delivery-${idx}`}>Add files in the Files section to deliver them to the installer (a preseed, a kickstart, an answer file).</p>;
  }
  return (
    <div className="delivery">
      <table className="delivery-matrix" data-testid={`delivery-${idx}`}>
        <caption>How each file reaches the installer of {vmName}</caption>
        <thead>
          <tr>
            <th scope="col">file</th>
            <th scope="col">Floppy <small>(drive A, this VM)</small></th>
            <th scope="col">HTTP directory <small>(gateway:8080, every VM)</small></th>
          </tr>
        </thead>
        <tbody>
          {files.map((f) => (
            <tr key={f.name} data-testid={`delivery-${idx}-${f.name}`}>
              <th scope="row">{f.name}{'url' in f ? <small> (URL)</small> : null}</th>
              <td>
                <input type="checkbox" aria-label={`${f.name} on the floppy of ${vmName}`} data-testid={`delivery-${idx}-${f.name}-floppy`}
                  checked={floppy.has(f.name)} onChange={(e) => toggle(floppyPath, f.name, e.target.checked)} />
              </td>
              <td>
                <input type="checkbox" aria-label={`${f.name} over HTTP`} data-testid={`delivery-${idx}-${f.name}-http`}
                  checked={http.has(f.name)} onChange={(e) => toggle(httpPath, f.name, e.target.checked)} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {onFloppy.length > 0 && (
        <p className={`section-note${floppyBytes > FLOPPY_BYTES ? ' over' : ''}`}>
          Floppy: {(floppyBytes / 1024).toFixed(1)} KiB of inline files{floppyBytes > FLOPPY_BYTES ? ': more than a 1.44 MB floppy holds' : ''}.
        </p>
      )}
      {http.size > 0 && (
        <p className="section-note">Boot commands reach the HTTP directory as <code>{'http://{{ .HTTPIP }}:{{ .HTTPPort }}/<name>'}</code>.</p>
      )}
    </div>
  );
}
