import { useState } from 'react';
import { secs } from './format.js';
import './Steps.css';

const ICON = { pending: '○', running: '◐', ok: '✓', failed: '✗', cached: '↺' };

// A VM's steps, each with its duration and, opened, its output as it streams in. A failed step
// opens by itself; the reader's own choice wins once made.
// `output[i]` is step i's output: [{id, line, stream}].
export default function Steps({ vm, output }) {
  const [chosen, setChosen] = useState({});
  return (
    <ol className="steps">
      {vm.steps.map((s, i) => {
        const lines = output[i] || [];
        const open = chosen[i] ?? s.status === 'failed';
        const id = `step-${vm.name}-${i}`;
        return (
          <li key={i} className={s.status} data-testid={id} data-status={s.status}>
            <button type="button" className="step-head" aria-expanded={open} aria-controls={`${id}-body`}
              data-testid={`${id}-toggle`} onClick={() => setChosen((c) => ({ ...c, [i]: !open }))}>
              <span className="icon" aria-label={s.status}>{ICON[s.status]}</span>
              <span className="step-name">{s.name}</span> <small>{s.kind}</small>
              {s.status === 'cached' && <small className="from-cache" data-testid={`${id}-cached`}> from the step cache</small>}
              {s.startedMs != null && <small className="at"> at {secs(s.startedMs)}</small>}
              {s.durationMs != null && <small className="took" data-testid={`${id}-duration`}> took {secs(s.durationMs)}</small>}
              <small className="count"> {lines.length ? `${lines.length} line${lines.length === 1 ? '' : 's'}` : ''}</small>
            </button>
            {s.message && <pre className="step-msg">{s.message}</pre>}
            {open && (
              <pre className="step-output" id={`${id}-body`} data-testid={`${id}-output`}>
                {lines.length ? lines.map((l) => (
                  <div key={l.id} className={l.stream === 'stderr' ? 'err' : 'out'}>{l.line}</div>
                )) : <span className="none">(no output)</span>}
              </pre>
            )}
          </li>
        );
      })}
    </ol>
  );
}

// Each VM's step output from a build's log entries, by VM name then step index: an output line
// belongs to the VM's step that started last.
export function stepOutput(lines) {
  const out = {};
  const cur = {};
  for (const e of lines) {
    if (e.event === 'stepStarted') cur[e.vm] = e.index;
    else if (e.event === 'stepOutput' && cur[e.vm] != null) {
      const vm = (out[e.vm] ||= {});
      (vm[cur[e.vm]] ||= []).push(e);
    }
  }
  return out;
}
