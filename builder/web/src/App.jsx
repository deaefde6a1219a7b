import { useCallback, useEffect, useRef, useState } from 'react';
import * as api from './api.js';
import Form from './Form.jsx';
import YamlEditor from './YamlEditor.jsx';
import BuildView from './BuildView.jsx';
import BuildList from './build/BuildList.jsx';

const NEW_MANIFEST = `vms:
  - name: vm1
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [] }
    resources: { cpu: 1, memory: 1Gi }
`;

export default function App() {
  const [names, setNames] = useState([]);
  const [dir, setDir] = useState('');
  const [name, setName] = useState('');
  const [text, setText] = useState('');
  const [doc, setDoc] = useState(null);
  const [diags, setDiags] = useState([]);
  const [tab, setTab] = useState('visual');
  const [status, setStatus] = useState('');
  const [busy, setBusy] = useState(0);
  // The build shown in the Build tab (the newest one, whichever manifest it built).
  const [buildId, setBuildId] = useState(null);
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
  // A page opened while a build runs (or after one) follows the newest build.
  useEffect(() => {
    api.listBuilds().then((bs) => {
      if (bs.length) setBuildId(bs[bs.length - 1].id);
    }, () => {});
  }, []);

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

  const create = async (n) => {
    if (!/\.(ya?ml)$/.test(n)) n += '.yaml';
    setName(n);
    nameRef.current = n;
    setText(NEW_MANIFEST);
    await runCheck(NEW_MANIFEST, true);
    setStatus(`new ${n} (not saved yet)`);
  };

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
      setBuildId(b.id);
      setTab('build');
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
    pending.current = api
      .toYaml(d, text)
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
      const y = await api.toYaml(doc, text);
      setText(y);
      await runCheck(y, false);
    }
    setTab(t);
  };

  const errors = diags.filter((d) => d.severity === 'error').length;
  const warnings = diags.length - errors;
  return (
    <div className="app">
      <header>
        <h1>kiln</h1>
        <select
          data-testid="manifest-picker"
          value={names.includes(name) ? name : ''}
          onChange={(e) => e.target.value && open(e.target.value)}
        >
          <option value="">open a manifest from {dir}…</option>
          {names.map((n) => (
            <option key={n} value={n}>{n}</option>
          ))}
        </select>
        <NewManifest onCreate={create} />
        <button data-testid="save" disabled={!name} onClick={save}>Save</button>
        <button
          data-testid="build-start"
          className="build-start"
          disabled={!name || errors > 0 || busy > 0}
          title={errors ? 'fix the errors first' : 'save and build this manifest'}
          onClick={startBuild}
        >
          Build
        </button>
        <span className="status" data-testid="status">{status}</span>
        <span
          className={errors ? 'count bad' : 'count good'}
          data-testid="diag-count"
          data-errors={errors}
          data-busy={busy > 0 ? '1' : '0'}
        >
          {name ? `${errors} errors, ${warnings} warnings` : ''}
        </span>
      </header>
      {(name || buildId != null) && (
        <>
          <nav className="tabs">
            {name && <button data-testid="tab-visual" className={tab === 'visual' ? 'on' : ''} onClick={() => switchTab('visual')}>Visual</button>}
            {name && <button data-testid="tab-yaml" className={tab === 'yaml' ? 'on' : ''} onClick={() => switchTab('yaml')}>YAML</button>}
            {buildId != null && (
              <button data-testid="tab-build" className={tab === 'build' || !name ? 'on' : ''} onClick={() => setTab('build')}>
                Builds
              </button>
            )}
          </nav>
          {tab === 'build' || !name ? (
            <>
              <BuildList current={buildId} onSelect={setBuildId} />
              <BuildView id={buildId} />
            </>
          ) : tab === 'yaml' ? (
            <YamlEditor text={text} diags={diags} onChange={onText} />
          ) : doc != null && typeof doc === 'object' && !Array.isArray(doc) ? (
            <Form doc={doc} diags={diags} onChange={onDoc} />
          ) : (
            <p className="blocked" data-testid="form-blocked">
              The YAML does not parse into a manifest: fix it in the YAML tab first.
            </p>
          )}
        </>
      )}
    </div>
  );
}

function NewManifest({ onCreate }) {
  const [n, setN] = useState('');
  return (
    <span className="new">
      <input data-testid="new-name" placeholder="new-module.yaml" value={n} onChange={(e) => setN(e.target.value)} />
      <button data-testid="new" disabled={!n} onClick={() => onCreate(n)}>New</button>
    </span>
  );
}
