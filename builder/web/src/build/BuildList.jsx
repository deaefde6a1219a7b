import { useEffect, useState } from 'react';
import * as api from '../api.js';
import { secs } from './format.js';
import './BuildList.css';

// How often the list is fetched again.
const POLL_MS = 2000;

// Every build the server remembers, newest first: [{id, manifest, module, status, ...}].
export function useBuilds() {
  const [builds, setBuilds] = useState([]);
  useEffect(() => {
    let stop = false;
    const load = () => api.listBuilds().then((b) => { if (!stop) setBuilds(b.slice().reverse()); }, () => {});
    load();
    const t = setInterval(load, POLL_MS);
    return () => { stop = true; clearInterval(t); };
  }, []);
  return builds;
}

const when = (ms) => new Date(ms).toLocaleTimeString();

// The builds, running and past, each a link to its page (`#/builds/<id>`). `onSelect`, if
// given, is called instead of following the link (for a page without routes).
export default function BuildList({ current, onSelect }) {
  const builds = useBuilds();
  if (!builds.length) return null;
  return (
    <nav className="build-list" aria-label="Builds" data-testid="build-list">
      <ul>
        {builds.map((b) => {
          const paused = b.vms.filter((v) => v.paused).map((v) => v.name);
          return (
            <li key={b.id}>
              <a href={`#/builds/${b.id}`} aria-current={b.id === current ? 'page' : undefined}
                data-testid={`build-item-${b.id}`} data-status={b.status} data-paused={paused.length ? '1' : '0'}
                onClick={onSelect ? (e) => { e.preventDefault(); onSelect(b.id); } : undefined}>
                <span className={`badge ${b.status}`}>{paused.length ? 'paused' : b.status}</span>
                <b> {b.module}</b> <small>#{b.id} {b.manifest} · {when(b.startedAt)}
                  {b.durationMs != null ? ` · ${secs(b.durationMs)}` : ` · ${b.phase}`}</small>
              </a>
            </li>
          );
        })}
      </ul>
    </nav>
  );
}
