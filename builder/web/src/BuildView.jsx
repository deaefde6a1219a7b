import { useEffect, useRef, useState } from 'react';
import * as api from './api.js';
import Console, { useConsoles } from './Console.jsx';

const BUILD_PHASES = ['Pending', 'Networking', 'Building', 'CapturingDisks', 'Succeeded'];
const VM_PHASES = ['Pending', 'SourceImporting', 'Booting', 'BootCommand', 'Provisioning', 'ShuttingDown', 'DiskCaptured', 'Succeeded'];
// Lines of output the page keeps (the server keeps more; the module's logs keep all).
const MAX_LINES = 5000;

const secs = (ms) => (ms == null ? '' : `${(ms / 1000).toFixed(1)} s`);
const mib = (b) => `${(b / (1 << 20)).toFixed(1)} MiB`;
const gib = (b) => `${(b / (1 << 30)).toFixed(1)} GiB`;

// Follows one build: its state and its log, over Server-Sent Events.
export function useBuild(id) {
  const [state, setState] = useState(null);
  const [lines, setLines] = useState([]);
  useEffect(() => {
    if (id == null) return undefined;
    setState(null);
    setLines([]);
    let last = -1;
    const es = api.buildEvents(id);
    es.addEventListener('state', (e) => setState(JSON.parse(e.data)));
    es.addEventListener('log', (e) => {
      const entry = JSON.parse(e.data);
      if (entry.id <= last) return; // a reconnect may resend
      last = entry.id;
      setLines((l) => {
        const next = l.length >= MAX_LINES ? l.slice(l.length - MAX_LINES + 1) : l.slice();
        next.push(entry);
        return next;
      });
    });
    es.addEventListener('end', () => es.close());
    return () => es.close();
  }, [id]);
  return [state, lines];
}

function describe(e) {
  const vm = e.vm ? `${e.vm}: ` : '';
  switch (e.event) {
    case 'build': return [`== build ${e.phase}${e.message ? `: ${e.message}` : ''}`, 'phase'];
    case 'vm': return [`${vm}${e.phase}${e.message ? ` (${e.message})` : ''}`, 'phase'];
    case 'stepStarted': return [`${vm}==> step ${e.index + 1} '${e.step}' (${e.kind})`, 'step'];
    case 'stepFinished':
      return [`${vm}<== step '${e.step}' ${e.ok ? 'ok' : 'FAILED'} in ${secs(e.durationMs)}${e.message ? `: ${e.message}` : ''}`, e.ok ? 'step' : 'bad'];
    case 'stepOutput': return [`${e.vm}| ${e.line}`, e.stream === 'stderr' ? 'err' : 'out'];
    case 'note': return [`${vm}${e.message}`, 'note'];
    case 'stderr': return [`kiln: ${e.line}`, 'err'];
    default: return [e.line ?? JSON.stringify(e), 'out'];
  }
}

function Phases({ list, marks, current, status, testid }) {
  const reached = new Map(marks.map((m) => [m.phase, m]));
  const failed = reached.has('Failed');
  const shown = list.filter((p) => p !== 'BootCommand' || reached.has(p));
  if (failed) shown.splice(shown.length - 1, 1, 'Failed');
  return (
    <ol className="phases">
      {shown.map((p) => {
        const m = reached.get(p);
        const cls = [m ? 'reached' : '', p === current ? 'current' : '', p === 'Failed' ? 'failed' : '',
          p === current && status === 'running' && p !== 'Succeeded' ? 'live' : ''].join(' ');
        return (
          <li key={p} className={cls} data-testid={`${testid}-${p}`} data-reached={m ? '1' : '0'}
            title={m ? `at ${secs(m.atMs)}${m.message ? `: ${m.message}` : ''}` : 'not reached'}>
            {p}{m ? <small> {secs(m.atMs)}</small> : null}
          </li>
        );
      })}
    </ol>
  );
}

const ICON = { pending: '○', running: '◐', ok: '✓', failed: '✗' };

function Vm({ build, vm, password }) {
  const [sent, setSent] = useState(false);
  const [err, setErr] = useState('');
  useEffect(() => setSent(false), [vm.paused?.index]);
  const resume = async () => {
    setSent(true);
    try {
      await api.resumeBuild(build.id, vm.name);
    } catch (e) {
      setErr(e.message);
      setSent(false);
    }
  };
  const p = vm.progress;
  return (
    <div className="vm-card" data-testid={`vm-${vm.name}`} data-phase={vm.phase}>
      <h3>{vm.name} <span className={`badge ${vm.phase}`} data-testid={`vm-${vm.name}-phase`}>{vm.phase}</span>
        {vm.message ? <small className="msg"> {vm.message}</small> : null}</h3>
      <Phases list={VM_PHASES} marks={vm.phases} current={vm.phase} status={build.status} testid={`vm-${vm.name}-phase`} />
      {p && <div className="progress">{p.what}: {mib(p.done)}{p.total ? ` of ${mib(p.total)}` : ''}</div>}
      {password && <Console buildId={build.id} vm={vm.name} password={password} />}
      {vm.paused && (
        <div className="pause" data-testid={`handbuild-${vm.name}`}>
          <b>Paused at handbuild step “{vm.paused.step}”</b>
          <pre data-testid={`handbuild-${vm.name}-instructions`}>{vm.paused.instructions}</pre>
          <p>Do the work on the VM (<code>kiln shell {vm.name}</code>), then continue the build
            (<code>kiln resume {vm.name}</code> does the same).</p>
          <button data-testid={`continue-${vm.name}`} disabled={sent} onClick={resume}>
            {sent ? 'Continuing…' : 'Continue'}
          </button>
          {err && <span className="bad"> {err}</span>}
        </div>
      )}
      {vm.steps.length > 0 && (
        <ol className="steps">
          {vm.steps.map((s, i) => (
            <li key={i} className={s.status} data-testid={`step-${vm.name}-${i}`} data-status={s.status}>
              <span className="icon">{ICON[s.status]}</span> {s.name} <small>{s.kind}</small>
              {s.durationMs != null && <small> {secs(s.durationMs)}</small>}
              {s.message && <pre className="step-msg">{s.message}</pre>}
            </li>
          ))}
        </ol>
      )}
    </div>
  );
}

function Module({ result }) {
  const r = result.record;
  return (
    <div className="module" data-testid="build-module">
      <h3>Module <code data-testid="build-module-name">{r.name}</code></h3>
      <p>At <code data-testid="build-module-dir">{result.dir}</code>, built by kiln {r.kilnVersion} on
        the {r.engine} engine in {r.buildSeconds.toFixed(0)} s.
        Use it with <code>kiln clone {r.name}</code> or as a <code>buildRef</code> source.</p>
      <table className="matrix">
        <thead><tr><th>VM</th><th>CPUs</th><th>memory</th><th>disk</th><th>size</th><th>file</th><th>sha256</th></tr></thead>
        <tbody>
          {r.vms.flatMap((vm) => vm.disks.map((d, i) => (
            <tr key={`${vm.name}-${d.name}`} data-testid={`module-disk-${vm.name}-${d.name}`}>
              <td>{i === 0 ? vm.name : ''}</td><td>{i === 0 ? vm.cpus : ''}</td>
              <td>{i === 0 ? `${vm.memoryMib} MiB` : ''}</td>
              <td><code>{d.file}</code></td><td>{gib(d.virtualSize)}</td><td>{mib(d.fileSize)}</td>
              <td><code title={d.sha256}>{d.sha256.slice(0, 12)}…</code></td>
            </tr>
          )))}
        </tbody>
      </table>
    </div>
  );
}

const STATUS_TEXT = { running: 'Running', succeeded: 'Succeeded', failed: 'Failed', cancelled: 'Cancelled' };

export default function BuildView({ build, lines }) {
  const [now, setNow] = useState(Date.now());
  const [cancelling, setCancelling] = useState(false);
  const logRef = useRef(null);
  const running = build?.status === 'running';
  const consoles = useConsoles(build);
  useEffect(() => {
    if (!running) return undefined;
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, [running]);
  useEffect(() => setCancelling(false), [build?.id]);
  // Keep the newest output in view unless the reader scrolled up.
  useEffect(() => {
    const el = logRef.current;
    if (el && el.scrollHeight - el.scrollTop - el.clientHeight < 80) el.scrollTop = el.scrollHeight;
  }, [lines]);
  if (!build) return <p className="build" data-testid="build-loading">Connecting to the build…</p>;
  const elapsed = build.durationMs ?? Math.max(0, now - build.startedAt);
  const cancel = async () => {
    setCancelling(true);
    try { await api.cancelBuild(build.id); } catch { setCancelling(false); }
  };
  return (
    <section className="build" data-testid="build" data-status={build.status}>
      <div className="build-head">
        <h2>Build {build.id}: <code>{build.manifest}</code> → module <code>{build.module}</code></h2>
        <span className={`badge ${build.status}`} data-testid="build-status">{STATUS_TEXT[build.status]}</span>
        <span className="elapsed" data-testid="build-elapsed">{secs(elapsed)}</span>
        {running && (
          <button data-testid="build-cancel" disabled={cancelling} onClick={cancel}>
            {cancelling ? 'Cancelling…' : 'Cancel'}
          </button>
        )}
      </div>
      <Phases list={BUILD_PHASES} marks={build.phases} current={build.phase} status={build.status} testid="build-phase" />
      <div className="vms">
        {build.vms.map((vm) => <Vm key={vm.name} build={build} vm={vm} password={consoles[vm.name]} />)}
      </div>
      {build.error && <pre className="build-error" data-testid="build-error">{build.error}</pre>}
      {build.result && <Module result={build.result} />}
      <h3>Output {build.logDropped ? <small>({build.logDropped} early lines dropped)</small> : null}</h3>
      <pre className="log" data-testid="build-log" ref={logRef}>
        {lines.map((e) => {
          const [text, cls] = describe(e);
          return <div key={e.id} className={cls}>{text}</div>;
        })}
      </pre>
    </section>
  );
}
