import { useCallback, useEffect, useState } from 'react';
import * as api from './api.js';
import Terminal from './Terminal.jsx';
import { href } from './route.js';
import { bytes, date, shortDigest } from './format.js';
import './ModulePage.css';

// How often clones are refreshed while one is starting, running or being acted on.
const POLL_MS = 2000;

// One module: its record (module.yaml, disks, inputs, VMs) and its clones, which can be made,
// started, stopped and deleted here; each VM of a running clone gets a terminal.
export default function ModulePage({ name }) {
  const [mod, setMod] = useState(null);
  const [error, setError] = useState('');
  const [acting, setActing] = useState({});
  const refresh = useCallback(() => api.getModule(name).then((m) => {
    setMod(m);
    setError('');
  }, (e) => setError(e.message)), [name]);
  useEffect(() => { refresh(); }, [refresh]);
  const live = mod?.clones.some((c) => c.state !== 'stopped') || Object.keys(acting).length > 0;
  useEffect(() => {
    if (!live) return undefined;
    const t = setInterval(refresh, POLL_MS);
    return () => clearInterval(t);
  }, [live, refresh]);

  // One action on a clone at a time; its error shows on the page.
  const act = async (key, what, fn) => {
    setActing((a) => ({ ...a, [key]: what }));
    try {
      await fn();
      setError('');
    } catch (e) {
      setError(e.message);
    } finally {
      setActing((a) => {
        const n = { ...a };
        delete n[key];
        return n;
      });
      refresh();
    }
  };

  if (!mod) {
    return (
      <div className="page">
        <h2>Module {name}</h2>
        {error ? <p className="error-box" role="alert" data-testid="module-error">{error}</p> : <p className="muted">Loading…</p>}
      </div>
    );
  }
  return (
    <div className="page module-page" data-testid="module-page">
      <div className="page-head">
        <h2 data-testid="module-name">{mod.name}</h2>
        <span className={`badge ${mod.status}`}>{mod.status}</span>
        <span className="muted">built {date(mod.record.builtAt)} · {mod.record.engine} · {mod.firmware}</span>
      </div>
      {error && <p className="error-box" role="alert" data-testid="module-error">{error}</p>}

      <section className="card" aria-labelledby="h-clones">
        <div className="section-head">
          <h3 id="h-clones">Clones</h3>
          <button type="button" className="primary" data-testid="make-clone" disabled={!!acting.make} onClick={() => act('make', 'making', () => api.makeClone(name))}>
            {acting.make ? 'Making a clone…' : 'Make a clone'}
          </button>
        </div>
        {mod.clones.length === 0 ? (
          <p className="muted">No clones of this module yet.</p>
        ) : (
          <ul className="clones" data-testid="module-clones">
            {mod.clones.map((c) => (
              <CloneItem key={c.name} clone={c} acting={acting[c.name]} act={act} />
            ))}
          </ul>
        )}
      </section>

      <section className="card" aria-labelledby="h-vms">
        <h3 id="h-vms">VMs</h3>
        <div className="table-wrap">
          <table className="data" data-testid="module-vms">
            <thead><tr><th scope="col">VM</th><th scope="col">CPUs</th><th scope="col">Memory</th><th scope="col">Boot</th><th scope="col">Agent in image</th></tr></thead>
            <tbody>
              {mod.vms.map((v) => (
                <tr key={v.name}><th scope="row">{v.name}</th><td>{v.cpus}</td><td>{v.memoryMib} MiB</td><td>{v.boot}</td><td>{v.agentInImage ? 'yes' : 'no'}</td></tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>

      <section className="card" aria-labelledby="h-disks">
        <h3 id="h-disks">Disks</h3>
        <div className="table-wrap">
          <table className="data" data-testid="module-disks">
            <thead><tr><th scope="col">Disk</th><th scope="col">Virtual size</th><th scope="col">File size</th><th scope="col">SHA-256</th><th scope="col">Layer over</th></tr></thead>
            <tbody>
              {mod.disks.map((d) => (
                <tr key={`${d.vm}-${d.name}`} data-testid={`module-disk-row-${d.vm}-${d.name}`}>
                  <th scope="row">{d.vm}/{d.name}</th>
                  <td>{bytes(d.virtualSize)}</td>
                  <td>{bytes(d.fileSize)}</td>
                  <td><code title={d.sha256}>{shortDigest(d.sha256)}</code></td>
                  <td>{d.backingModule ? <a href={href('modules', d.backingModule)}>{d.backingModule}</a> : '—'}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>

      <section className="card" aria-labelledby="h-inputs">
        <h3 id="h-inputs">Inputs</h3>
        <p className="muted">What each VM's source resolved to when it was built, and the ISOs it attached.</p>
        {mod.vms.map((v) => (
          <div key={v.name} className="input">
            <details>
              <summary><strong>{v.name}</strong> <span className="muted">{sourceKind(v.source)}</span></summary>
              <pre className="code" data-testid={`module-input-${v.name}`}>{JSON.stringify(v.source, null, 2)}</pre>
            </details>
            {v.isos.length > 0 && (
              <ul>{v.isos.map((i) => <li key={i.url}>{i.url} <code title={i.sha256}>{shortDigest(i.sha256)}</code></li>)}</ul>
            )}
          </div>
        ))}
      </section>

      <section className="card" aria-labelledby="h-record">
        <h3 id="h-record">Record</h3>
        <p className="muted">{mod.dir}</p>
        <details>
          <summary>module.yaml</summary>
          <pre className="code" data-testid="module-yaml">{mod.text}</pre>
        </details>
        <details>
          <summary>The manifest it was built from</summary>
          <pre className="code" data-testid="module-manifest">{mod.manifest}</pre>
        </details>
      </section>
    </div>
  );
}

// What kind of source a VM was built from (the key of its resolved source), and from what.
function sourceKind(src) {
  if (!src || typeof src !== 'object') return '';
  const [kind, v] = Object.entries(src)[0] || [];
  const what = v && typeof v === 'object' ? v.name || v.url || v.distro || '' : '';
  return [kind, what].filter(Boolean).join(': ');
}

function CloneItem({ clone: c, acting, act }) {
  const [confirming, setConfirming] = useState(false);
  const stopped = c.state === 'stopped';
  return (
    <li className="clone" data-testid={`clone-${c.name}`} data-state={acting || c.state}>
      <div className="clone-head">
        <strong>{c.name}</strong>
        <span className={`badge ${c.state}`} data-testid={`clone-state-${c.name}`}>{acting || c.state}</span>
        <span className="muted">{c.vms.join(', ')}</span>
        <span className="spacer" />
        {stopped ? (
          <button type="button" data-testid={`clone-start-${c.name}`} disabled={!!acting} onClick={() => act(c.name, 'starting', () => api.startClone(c.name))}>Start</button>
        ) : (
          <button type="button" data-testid={`clone-stop-${c.name}`} disabled={!!acting || !c.ours} title={c.ours ? 'power its VMs off' : 'started outside kiln serve: stop it where it runs'} onClick={() => act(c.name, 'stopping', () => api.stopClone(c.name))}>Stop</button>
        )}
        {confirming ? (
          <span className="confirm" role="group" aria-label={`Delete ${c.name}?`}>
            <button type="button" className="danger" data-testid={`clone-delete-confirm-${c.name}`} onClick={() => { setConfirming(false); act(c.name, 'deleting', () => api.deleteClone(c.name)); }}>Delete {c.name}</button>
            <button type="button" onClick={() => setConfirming(false)}>Keep</button>
          </span>
        ) : (
          <button type="button" className="danger" data-testid={`clone-delete-${c.name}`} disabled={!stopped || !!acting} title={stopped ? 'delete this clone' : 'stop it first'} onClick={() => setConfirming(true)}>Delete</button>
        )}
      </div>
      {c.exit && stopped && <p className="muted">last run: {c.exit}</p>}
      {c.log && (
        <details>
          <summary>kiln run output</summary>
          <pre className="code log-tail" data-testid={`clone-log-${c.name}`}>{c.log}</pre>
        </details>
      )}
      {c.runningVms.map((vm) => (
        <div key={vm} className="terminal-box">
          <h4>{c.name}/{vm}</h4>
          <Terminal clone={c.name} vm={vm} />
        </div>
      ))}
    </li>
  );
}
