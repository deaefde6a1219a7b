import { useEffect, useMemo, useRef, useState } from 'react';
import * as api from './api.js';
import { useConsoles } from './Console.jsx';
import Timeline from './build/Timeline.jsx';
import VmCard from './build/VmCard.jsx';
import ModuleResult from './build/ModuleResult.jsx';
import LogFiles, { useLogFiles } from './build/LogFiles.jsx';
import { stepOutput } from './build/Steps.jsx';
import { secs } from './build/format.js';
import './BuildView.css';

const BUILD_PHASES = ['Pending', 'Networking', 'Building', 'CapturingDisks', 'Succeeded'];
// Lines of output the page keeps (the server keeps more; the build's log files keep all).
const MAX_LINES = 5000;

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

const STATUS_TEXT = { running: 'Running', succeeded: 'Succeeded', failed: 'Failed', cancelled: 'Cancelled' };

// One build's page: its phases and each VM's (as timelines), steps with their output, screens,
// handbuild pauses, the module it made or why it failed, its log files, and its whole output.
export default function BuildView({ id }) {
  const [build, lines] = useBuild(id);
  const [now, setNow] = useState(Date.now());
  const [cancelling, setCancelling] = useState(false);
  const logRef = useRef(null);
  const running = build?.status === 'running';
  const consoles = useConsoles(build);
  const files = useLogFiles(build?.id, build?.status);
  const output = useMemo(() => stepOutput(lines), [lines]);
  useEffect(() => {
    if (!running) return undefined;
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, [running]);
  useEffect(() => setCancelling(false), [id]);
  // Keep the newest output in view unless the reader scrolled up.
  useEffect(() => {
    const el = logRef.current;
    if (el && el.scrollHeight - el.scrollTop - el.clientHeight < 80) el.scrollTop = el.scrollHeight;
  }, [lines]);
  if (id == null) return <p className="build" data-testid="build-none">No build yet.</p>;
  if (!build) return <p className="build" data-testid="build-loading">Connecting to the build…</p>;
  const elapsed = build.durationMs ?? Math.max(0, now - build.startedAt);
  const cancel = async () => {
    setCancelling(true);
    try { await api.cancelBuild(build.id); } catch { setCancelling(false); }
  };
  return (
    <section className="build" data-testid="build" data-build-id={build.id} data-status={build.status} aria-labelledby="build-title">
      <div className="build-head">
        <h2 id="build-title">Build {build.id}: <code>{build.manifest}</code> → module <code>{build.module}</code></h2>
        <span className={`badge ${build.status}`} data-testid="build-status" role="status">{STATUS_TEXT[build.status]}</span>
        <span className="elapsed" data-testid="build-elapsed">{secs(elapsed)}</span>
        {running && (
          <button type="button" data-testid="build-cancel" disabled={cancelling} onClick={cancel}>
            {cancelling ? 'Cancelling…' : 'Cancel'}
          </button>
        )}
      </div>
      <Timeline list={BUILD_PHASES} marks={build.phases} current={build.phase} running={running}
        endMs={elapsed} testid="build-phase" label="Build phases" />
      {/* Keyed by build: a page switched to another build starts its VMs' screens afresh. */}
      <div className="vms" key={build.id}>
        {build.vms.map((vm) => (
          <VmCard key={vm.name} build={build} vm={vm} password={consoles[vm.name]} endMs={elapsed}
            output={output[vm.name] || {}} files={files} />
        ))}
      </div>
      {build.error && <pre className="build-error" data-testid="build-error">{build.error}</pre>}
      {build.result && <ModuleResult result={build.result} />}
      <LogFiles id={build.id} files={files} />
      <h3>Output {build.logDropped ? <small>({build.logDropped} early lines dropped: the log files have them)</small> : null}</h3>
      <pre className="log" data-testid="build-log" ref={logRef} tabIndex={0} aria-label="Build output">
        {lines.map((e) => {
          const [text, cls] = describe(e);
          return <div key={e.id} className={cls}>{text}</div>;
        })}
      </pre>
    </section>
  );
}
