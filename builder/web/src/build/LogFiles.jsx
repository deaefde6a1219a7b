import { useEffect, useState } from 'react';
import * as api from '../api.js';
import { size } from './format.js';
import './LogFiles.css';

// How often a running build's log files are listed again (screenshots appear as it boots).
const POLL_MS = 3000;

// A build's log files, [{name, size}]: listed while it runs, and once more when it ends (the
// files then move to the module, or to the failed builds' logs).
export function useLogFiles(id, status) {
  const [files, setFiles] = useState([]);
  useEffect(() => setFiles([]), [id]);
  useEffect(() => {
    if (id == null || status == null) return undefined;
    let stop = false;
    const load = () => api.buildLogFiles(id).then((f) => { if (!stop) setFiles(f); }, () => {});
    load();
    const t = status === 'running' ? setInterval(load, POLL_MS) : null;
    return () => { stop = true; clearInterval(t); };
  }, [id, status]);
  return files;
}

const WHAT = [
  [/^events\.jsonl$/, () => 'the build log (its events, one JSON line each)'],
  [/^(.+)-serial\.log$/, (m) => `${m[1]}: serial console`],
  [/^(.+)-boot-(\d+)\.png$/, (m) => `${m[1]}: boot-command screen ${m[2]}`],
  [/^(.+)\.log$/, (m) => `${m[1]}: its steps' output`],
];
const describe = (name) => {
  for (const [re, f] of WHAT) {
    const m = name.match(re);
    if (m) return f(m);
  }
  return '';
};

// The log files to download.
export default function LogFiles({ id, files }) {
  if (!files.length) return null;
  return (
    <section className="log-files" data-testid="log-files" aria-labelledby="log-files-title">
      <h3 id="log-files-title">Logs</h3>
      <ul>
        {files.map((f) => (
          <li key={f.name}>
            <a href={api.buildLogUrl(id, f.name, true)} download={f.name} data-testid={`log-file-${f.name}`}>{f.name}</a>
            <small> {size(f.size)} {describe(f.name)}</small>
          </li>
        ))}
      </ul>
    </section>
  );
}
