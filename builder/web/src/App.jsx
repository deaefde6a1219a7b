import { useCallback, useEffect, useRef, useState } from 'react';
import * as api from './api.js';
import Form from './Form.jsx';
import YamlEditor from './YamlEditor.jsx';
import { docToText } from './doc.js';
import BuildView from './BuildView.jsx';
import BuildList from './build/BuildList.jsx';
import Home from './Home.jsx';
import ModulePage from './ModulePage.jsx';
import HelpDialog from './HelpDialog.jsx';
import { go, href, useRoute } from './route.js';

const NEW_MANIFEST = `vms:
  - name: vm1
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 1, memory: 1Gi }
`;

// How often the header's build count is refreshed.
const BUILDS_POLL_MS = 3000;

// Keys typed into an editor, a field or a terminal are theirs: shortcuts ignore them.
const typing = (t) => t instanceof Element && t.closest('input, textarea, select, [contenteditable=""], [contenteditable="true"]');

export default function App() {
  const route = useRoute();
  const [names, setNames] = useState([]);
  const [dir, setDir] = useState('');
  const [name, setName] = useState('');
  const [text, setText] = useState('');
  const [doc, setDoc] = useState(null);
  const [diags, setDiags] = useState([]);
  const [tab, setTab] = useState('visual');
  const [status, setStatus] = useState('');
  const [busy, setBusy] = useState(0);
  const [builds, setBuilds] = useState([]);
  const [help, setHelp] = useState(false);
  const seq = useRef(0);
  const nameRef = useRef('');
  nameRef.current = name;

  const refreshList = useCallback(() => {
    api.listManifests().then((v) => {
      setNames(v.names);
      setDir(v.dir);
    }, (e) => setStatus(e.message));
  }, []);
  useEffect(refreshList, [refreshList]);

  const refreshBuilds = useCallback(() => api.listBuilds().then(setBuilds, () => {}), []);
  useEffect(() => {
    refreshBuilds();
    const t = setInterval(refreshBuilds, BUILDS_POLL_MS);
    return () => clearInterval(t);
  }, [refreshBuilds]);
  // A view change shows the builds as they are now, not as of the last poll.
  useEffect(() => { refreshBuilds(); }, [route.view, route.arg, refreshBuilds]);

  // Validate text; the newest request wins.
  const runCheck = useCallback(async (t, takeDoc) => {
    const n = ++seq.current;
    setBusy((b) => b + 1);
    try {
      const v = await api.check(nameRef.current, t);
      if (n !== seq.current) return;
      setDiags(v.diagnostics);
      if (takeDoc) setDoc(v.doc);
    } catch (e) {
      setStatus(e.message);
    } finally {
      setBusy((b) => b - 1);
    }
  }, []);

  const open = async (n) => {
    try {
      const v = await api.readManifest(n);
      setName(n);
      nameRef.current = n;
      setText(v.text);
      setStatus(`opened ${n}`);
      await runCheck(v.text, true);
    } catch (e) {
      setStatus(e.message);
    }
  };

  // A new manifest (not saved yet), from the New button or a recipe.
  const create = async (n, initial = NEW_MANIFEST) => {
    if (!/\.(ya?ml)$/.test(n)) n += '.yaml';
    setName(n);
    nameRef.current = n;
    setText(initial);
    setTab('visual');
    go('edit', n);
    await runCheck(initial, true);
    setStatus(`new ${n} (not saved yet)`);
  };

  // The editor route opens its manifest, unless it is the one on the page (a new one
  // included, which is not on disk yet).
  useEffect(() => {
    if (route.view === 'edit' && route.arg && route.arg !== nameRef.current) open(route.arg);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [route.view, route.arg]);

  const save = async () => {
    try {
      await api.saveManifest(name, text);
      setStatus(`saved ${name}`);
      refreshList();
    } catch (e) {
      setStatus(e.message);
    }
  };

  // Build runs the manifest file: save what is on the page first, then start it.
  const startBuild = async () => {
    try {
      await pending.current;
      await api.saveManifest(name, text);
      refreshList();
      const b = await api.startBuild(name);
      refreshBuilds();
      go('builds', b.id);
      setStatus(`saved ${name}; building module ${b.module}`);
    } catch (e) {
      setStatus(e.message);
    }
  };

  // YAML tab edits: the text is the truth; the document follows it when it parses.
  const onText = (t) => {
    setText(t);
    runCheck(t, true);
  };

  // Form edits: the document is the truth; the text is regenerated from it.
  const pending = useRef(Promise.resolve());
  const onDoc = (d) => {
    setDoc(d);
    const n = ++seq.current;
    setBusy((b) => b + 1);
    pending.current = docToText(d, text)
      .then(async (t) => {
        if (n !== seq.current) return;
        setText(t);
        const v = await api.check(nameRef.current, t);
        if (n === seq.current) setDiags(v.diagnostics);
      })
      .catch((e) => setStatus(e.message))
      .finally(() => setBusy((b) => b - 1));
  };

  // Leaving the form: the YAML is the form's document, written canonically.
  const switchTab = async (t) => {
    if (t === tab) return;
    if (t === 'yaml' && tab === 'visual' && doc != null) {
      await pending.current;
      const y = await docToText(doc, text);
      setText(y);
      await runCheck(y, false);
    }
    setTab(t);
  };

  const editing = route.view === 'edit' && name !== '';
  // Shortcuts: Ctrl/Cmd+S saves in the editor (whatever has focus); the others only when no
  // field, editor or terminal has the keys.
  const keys = useRef({});
  keys.current = { editing, save, builds };
  useEffect(() => {
    const onKey = (e) => {
      const k = keys.current;
      if ((e.ctrlKey || e.metaKey) && !e.altKey && e.key.toLowerCase() === 's') {
        if (!k.editing) return;
        e.preventDefault();
        k.save();
        return;
      }
      if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
      if (e.key === '?') setHelp(true);
      else if (e.key === 'h') go('home');
      else if (e.key === 'e' && nameRef.current) go('edit', nameRef.current);
      else if (e.key === 'b' && k.builds.length) go('builds', k.builds[k.builds.length - 1].id);
    };
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, []);

  const errors = diags.filter((d) => d.severity === 'error').length;
  const warnings = diags.length - errors;
  const running = builds.filter((b) => b.status === 'running');
  const building = running.some((b) => b.manifest === name);
  const newest = builds.length ? builds[builds.length - 1] : null;
  return (
    <div className="app">
      <a className="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>
        Skip to content
      </a>
      <header className="top">
        <h1><a href={href('home')} aria-label="kiln: home">kiln</a></h1>
        <nav aria-label="Main" className="nav">
          <a data-testid="nav-home" href={href('home')} aria-current={route.view === 'home' ? 'page' : undefined}>Home</a>
          {name && (
            <a data-testid="nav-edit" href={href('edit', name)} aria-current={route.view === 'edit' ? 'page' : undefined}>
              {name}
            </a>
          )}
          {newest && (
            <a data-testid="nav-builds" href={href('builds', newest.id)} aria-current={route.view === 'builds' ? 'page' : undefined}>
              Builds{running.length ? ` · ${running.length} running` : ''}
            </a>
          )}
        </nav>
        <select
          data-testid="manifest-picker"
          aria-label="Open a manifest"
          value={editing && names.includes(name) ? name : ''}
          onChange={(e) => e.target.value && go('edit', e.target.value)}
        >
          <option value="">open a manifest from {dir}…</option>
          {names.map((n) => (
            <option key={n} value={n}>{n}</option>
          ))}
        </select>
        <NewManifest onCreate={(n) => create(n)} />
        <button type="button" className="icon" data-testid="help-open" aria-label="Keyboard shortcuts" onClick={() => setHelp(true)}>?</button>
      </header>
      <main id="main" tabIndex={-1}>
        {route.view === 'home' && (
          <Home names={names} dir={dir} builds={builds} onCreate={create} />
        )}
        {route.view === 'modules' && <ModulePage key={route.arg} name={route.arg} />}
        {route.view === 'builds' && <BuildRoute id={Number(route.arg)} />}
        {route.view === 'edit' && route.arg !== name && (
          <p className="muted" data-testid="edit-opening">Opening {route.arg}… (the status line says if it cannot be read)</p>
        )}
        {route.view === 'edit' && name && (
          <>
            <div className="toolbar" role="toolbar" aria-label="Editor">
              <div className="tabs" role="tablist" aria-label="Editor mode">
                <button type="button" role="tab" aria-selected={tab === 'visual'} data-testid="tab-visual" className={tab === 'visual' ? 'on' : ''} onClick={() => switchTab('visual')}>Visual</button>
                <button type="button" role="tab" aria-selected={tab === 'yaml'} data-testid="tab-yaml" className={tab === 'yaml' ? 'on' : ''} onClick={() => switchTab('yaml')}>YAML</button>
              </div>
              <span className="spacer" />
              <button type="button" data-testid="save" disabled={!name} onClick={save} title="Save (Ctrl+S)">Save</button>
              <button
                type="button"
                data-testid="build-start"
                className="primary build-start"
                disabled={!name || errors > 0 || busy > 0 || building}
                title={building ? 'this manifest is building' : errors ? 'fix the errors first' : 'save and build this manifest'}
                onClick={startBuild}
              >
                Build
              </button>
            </div>
            {tab === 'yaml' ? (
              <YamlEditor text={text} diags={diags} onChange={onText} name={name} />
            ) : doc != null && typeof doc === 'object' && !Array.isArray(doc) ? (
              <Form doc={doc} diags={diags} onChange={onDoc} />
            ) : (
              <p className="blocked" data-testid="form-blocked">
                The YAML does not parse into a manifest: fix it in the YAML tab first.
              </p>
            )}
          </>
        )}
      </main>
      <footer className="statusline">
        <span className="status" data-testid="status" role="status">{status}</span>
        <span
          className={errors ? 'count bad' : 'count good'}
          data-testid="diag-count"
          data-errors={errors}
          data-busy={busy > 0 ? '1' : '0'}
        >
          {name ? `${errors} errors, ${warnings} warnings` : ''}
        </span>
      </footer>
      <HelpDialog open={help} onClose={() => setHelp(false)} />
    </div>
  );
}

// One build's page, beside the list of builds to switch between.
function BuildRoute({ id }) {
  const shown = Number.isFinite(id) ? id : null;
  return (
    <div className="builds-page">
      <BuildList current={shown} />
      <BuildView id={shown} />
    </div>
  );
}

function NewManifest({ onCreate }) {
  const [n, setN] = useState('');
  return (
    <form className="new" onSubmit={(e) => { e.preventDefault(); if (n) onCreate(n); }}>
      <input data-testid="new-name" aria-label="New manifest file name" placeholder="new-module.yaml" value={n} onChange={(e) => setN(e.target.value)} />
      <button type="submit" data-testid="new" disabled={!n}>New</button>
    </form>
  );
}
