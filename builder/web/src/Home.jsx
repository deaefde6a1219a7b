import { useCallback, useEffect, useState } from 'react';
import * as api from './api.js';
import { RECIPES } from './recipes.js';
import { href } from './route.js';
import { bytes, date, duration, shortDigest } from './format.js';
import './Home.css';

// How often modules and clones are refreshed while the home page is shown.
const POLL_MS = 5000;

// The home page: the folder's manifests, the modules built from them, their clones, the
// recent builds, and new modules from recipes.
export default function Home({ names, dir, builds, onCreate }) {
  const [mods, setMods] = useState(null);
  const [clones, setClones] = useState(null);
  const [error, setError] = useState('');
  const refresh = useCallback(() => {
    Promise.all([api.listModules(), api.listClones()]).then(([m, c]) => {
      setMods(m);
      setClones(c);
      setError('');
    }, (e) => setError(e.message));
  }, []);
  useEffect(() => {
    refresh();
    const t = setInterval(refresh, POLL_MS);
    return () => clearInterval(t);
  }, [refresh]);

  return (
    <div className="home page" data-testid="home">
      {error && <p className="error-box" role="alert">{error}</p>}
      <div className="home-grid">
        <section className="card" aria-labelledby="h-manifests">
          <h2 id="h-manifests">Manifests</h2>
          <p className="muted">in {dir}</p>
          {names.length === 0 ? (
            <p className="muted">No manifests yet: start one from a recipe.</p>
          ) : (
            <ul className="manifest-list" data-testid="home-manifests">
              {names.map((n) => (
                <li key={n}><a data-testid={`manifest-link-${n}`} href={href('edit', n)}>{n}</a></li>
              ))}
            </ul>
          )}
        </section>
        <NewFromRecipe modules={mods?.modules || []} onCreate={onCreate} />
      </div>

      <section className="card" aria-labelledby="h-modules">
        <h2 id="h-modules">Modules</h2>
        {mods && <p className="muted">in {mods.dir}</p>}
        {mods && mods.modules.length === 0 && <p className="muted">No modules yet: build a manifest.</p>}
        {mods && mods.modules.length > 0 && (
          <div className="table-wrap">
            <table className="data" data-testid="home-modules">
              <thead>
                <tr><th scope="col">Module</th><th scope="col">VMs</th><th scope="col">Size</th><th scope="col">Built</th><th scope="col">Digest</th><th scope="col">Firmware</th><th scope="col">Status</th><th scope="col">Clones</th></tr>
              </thead>
              <tbody>
                {mods.modules.map((m) => (
                  <tr key={m.name} data-testid={`module-row-${m.name}`}>
                    <th scope="row"><a href={href('modules', m.name)} data-testid={`module-link-${m.name}`}>{m.name}</a></th>
                    <td>{m.vms.join(', ')}</td>
                    <td title={`virtual ${bytes(m.virtualSize)}`}>{bytes(m.size)}</td>
                    <td>{date(m.builtAt)}</td>
                    <td><code title={m.digest || ''}>{shortDigest(m.digest)}</code></td>
                    <td>{m.firmware}</td>
                    <td><span className={`badge ${m.status}`}>{m.status}</span></td>
                    <td>{m.clones}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </section>

      <section className="card" aria-labelledby="h-clones">
        <h2 id="h-clones">Clones</h2>
        {clones && clones.clones.length === 0 && <p className="muted">No clones: make one on a module's page.</p>}
        {clones && clones.clones.length > 0 && (
          <ul className="clone-list" data-testid="home-clones">
            {clones.clones.map((c) => (
              <li key={c.name} data-testid={`home-clone-${c.name}`} data-state={c.state}>
                <span className={`badge ${c.state}`}>{c.state}</span>{' '}
                <strong>{c.name}</strong> of <a href={href('modules', c.module)}>{c.module}</a>
                <span className="muted"> · {c.vms.join(', ')}</span>
              </li>
            ))}
          </ul>
        )}
      </section>

      <section className="card" aria-labelledby="h-builds">
        <h2 id="h-builds">Recent builds</h2>
        {builds.length === 0 ? (
          <p className="muted">No builds since this server started.</p>
        ) : (
          <ul className="build-list" data-testid="home-builds">
            {builds.slice().reverse().map((b) => (
              <li key={b.id} data-testid={`home-build-${b.id}`} data-status={b.status}>
                <a href={href('builds', b.id)}>
                  <span className={`badge ${b.status}`}>{b.status}</span>{' '}
                  #{b.id} {b.module} <span className="muted">from {b.manifest} · {new Date(b.startedAt).toLocaleTimeString()}{b.durationMs != null ? ` · ${duration(b.durationMs)}` : ''}</span>
                </a>
              </li>
            ))}
          </ul>
        )}
      </section>
    </div>
  );
}

// "New module": a recipe, a file name and (for a layered build) the module to build on.
function NewFromRecipe({ modules, onCreate }) {
  const [recipe, setRecipe] = useState('single');
  const [file, setFile] = useState('');
  const [base, setBase] = useState('');
  const r = RECIPES.find((x) => x.id === recipe);
  const baseModule = modules.find((m) => m.name === base) || modules[0];
  const blocked = !file || (r.needsModule && !baseModule);
  const submit = (e) => {
    e.preventDefault();
    if (blocked) return;
    const opts = r.needsModule
      ? { module: baseModule.name, vm: baseModule.vms.length > 1 ? baseModule.vms[0] : '' }
      : {};
    onCreate(file, r.make(opts));
  };
  return (
    <section className="card" aria-labelledby="h-new">
      <h2 id="h-new">New module</h2>
      <form className="recipe-form" onSubmit={submit} data-testid="recipe-form">
        <fieldset>
          <legend>Start from</legend>
          {RECIPES.map((x) => (
            <label key={x.id} className="recipe">
              <input type="radio" name="recipe" value={x.id} data-testid={`recipe-${x.id}`} checked={recipe === x.id} onChange={() => setRecipe(x.id)} />
              <span><strong>{x.title}</strong> <span className="muted">{x.about}</span></span>
            </label>
          ))}
        </fieldset>
        {r.needsModule && (
          <label className="field">
            <span>Module to build on</span>
            <select data-testid="recipe-module" value={baseModule?.name || ''} onChange={(e) => setBase(e.target.value)} disabled={!modules.length}>
              {modules.length === 0 && <option value="">no modules yet: build one first</option>}
              {modules.map((m) => <option key={m.name} value={m.name}>{m.name}</option>)}
            </select>
          </label>
        )}
        <label className="field">
          <span>File name</span>
          <input data-testid="recipe-name" placeholder="my-module.yaml" value={file} onChange={(e) => setFile(e.target.value)} />
        </label>
        <button type="submit" className="primary" data-testid="recipe-create" disabled={blocked}>Open in the editor</button>
      </form>
    </section>
  );
}
