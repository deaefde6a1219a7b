import { secs } from './format.js';
import './Timeline.css';

// Phases that end a run: a point on the timeline, not a segment.
const FINAL = new Set(['Succeeded', 'Failed']);

// A run's phases as a timeline: each phase reached is a segment as long as it lasted (from its
// mark to the next one, or to now while it runs), the phases not reached yet follow, greyed.
// `list` is the usual order, `marks` the phases reached ({phase, atMs, message}), `endMs` the
// time (since the build started) the timeline ends at: now, or the build's end.
export default function Timeline({ list, marks, current, running, endMs, testid, label }) {
  const segs = marks.map((m, i) => {
    const next = marks[i + 1]?.atMs ?? (FINAL.has(m.phase) ? m.atMs : endMs);
    return { ...m, duration: Math.max(0, next - m.atMs) };
  });
  const reached = new Set(marks.map((m) => m.phase));
  const failed = reached.has('Failed');
  const later = list.filter((p) => !reached.has(p) && p !== 'BootCommand' && !(failed && p === 'Succeeded'));
  const total = Math.max(1, segs.reduce((a, s) => a + s.duration, 0));
  return (
    <ol className="timeline" aria-label={label}>
      {segs.map((s, i) => {
        const live = running && i === segs.length - 1 && !FINAL.has(s.phase);
        const cls = ['reached', s.phase === current ? 'current' : '', live ? 'live' : '',
          s.phase === 'Failed' ? 'failed' : '', FINAL.has(s.phase) ? 'final' : ''].join(' ');
        const text = `${s.phase}: from ${secs(s.atMs)}${FINAL.has(s.phase) ? '' : `, ${secs(s.duration)}`}${s.message ? ` (${s.message})` : ''}`;
        return (
          <li key={`${s.phase}-${s.atMs}-${i}`} className={cls} data-testid={`${testid}-${s.phase}`} data-reached="1"
            data-start-ms={s.atMs} data-duration-ms={s.duration} title={text}
            style={FINAL.has(s.phase) ? undefined : { flexGrow: s.duration / total }}>
            <span className="name">{s.phase}</span>
            <small className="when">{secs(s.atMs)}{FINAL.has(s.phase) ? '' : ` · ${secs(s.duration)}`}</small>
          </li>
        );
      })}
      {later.map((p) => (
        <li key={p} className="later" data-testid={`${testid}-${p}`} data-reached="0" title={`${p}: not reached`}>
          <span className="name">{p}</span>
        </li>
      ))}
    </ol>
  );
}
