import { useEffect, useState } from 'react';
import * as api from '../api.js';
import Console from '../Console.jsx';
import Timeline from './Timeline.jsx';
import Steps from './Steps.jsx';
import Screenshots from './Screenshots.jsx';
import { mib } from './format.js';
import './VmCard.css';

const VM_PHASES = ['Pending', 'SourceImporting', 'Booting', 'BootCommand', 'Provisioning', 'ShuttingDown', 'DiskCaptured', 'Succeeded'];

// One VM of a build: its phase timeline, its screen while it runs, a handbuild pause with
// Continue, its boot-command screenshots and its steps with their output.
export default function VmCard({ build, vm, password, endMs, output, files }) {
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
    <section className="vm-card" data-testid={`vm-${vm.name}`} data-phase={vm.phase} aria-label={`VM ${vm.name}`}>
      <h3>{vm.name} <span className={`badge ${vm.phase}`} data-testid={`vm-${vm.name}-phase`}>{vm.phase}</span>
        {vm.message ? <small className="msg"> {vm.message}</small> : null}</h3>
      <Timeline list={VM_PHASES} marks={vm.phases} current={vm.phase} running={build.status === 'running'}
        endMs={endMs} testid={`vm-${vm.name}-phase`} label={`${vm.name}: phases`} />
      {p && <div className="progress">{p.what}: {mib(p.done)}{p.total ? ` of ${mib(p.total)}` : ''}</div>}
      {password && <Console buildId={build.id} vm={vm.name} password={password} />}
      {vm.paused && (
        <div className="pause" data-testid={`handbuild-${vm.name}`} role="status">
          <b>Paused at handbuild step “{vm.paused.step}”</b>
          <pre data-testid={`handbuild-${vm.name}-instructions`}>{vm.paused.instructions}</pre>
          <p>Do the work on the VM (<code>kiln shell {vm.name}</code>), then continue the build
            (<code>kiln resume {vm.name}</code> does the same).</p>
          <button type="button" data-testid={`continue-${vm.name}`} disabled={sent} onClick={resume}>
            {sent ? 'Continuing…' : 'Continue'}
          </button>
          {err && <span className="bad"> {err}</span>}
        </div>
      )}
      <Screenshots id={build.id} vm={vm.name} files={files} />
      {vm.steps.length > 0 && <Steps vm={vm} output={output} />}
    </section>
  );
}
