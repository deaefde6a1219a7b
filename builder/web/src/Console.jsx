import { useEffect, useRef, useState } from 'react';
import RFB from '@novnc/novnc';
import * as api from './api.js';

// How often a running build is asked which of its VMs have a console (a VM gets one as it boots).
const POLL_MS = 2000;

// The consoles of a running build's VMs, by VM name: {vm: password}. Invisible VMs never have one.
export function useConsoles(build) {
  const [consoles, setConsoles] = useState({});
  const id = build?.id;
  const running = build?.status === 'running';
  useEffect(() => {
    setConsoles({});
    if (id == null || !running) return undefined;
    let stop = false;
    const poll = async () => {
      try {
        const list = await api.buildConsoles(id);
        if (stop) return;
        setConsoles((old) => {
          const next = Object.fromEntries(list.map((c) => [c.vm, c.password]));
          const same = Object.keys(next).length === Object.keys(old).length
            && Object.entries(next).every(([k, v]) => old[k] === v);
          return same ? old : next;
        });
      } catch { /* the build ended meanwhile: the next state says so */ }
    };
    poll();
    const t = setInterval(poll, POLL_MS);
    return () => { stop = true; clearInterval(t); };
  }, [id, running]);
  return consoles;
}

// A VM's live screen: noVNC over the server's WebSocket, which carries the VM's VNC stream.
export default function Console({ buildId, vm, password }) {
  const screen = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    setStatus('connecting');
    const rfb = new RFB(screen.current, api.consoleUrl(buildId, vm), { credentials: { password } });
    rfb.scaleViewport = true;
    rfb.addEventListener('connect', () => setStatus('connected'));
    rfb.addEventListener('disconnect', (e) => setStatus(e.detail.clean ? 'closed' : 'lost'));
    rfb.addEventListener('securityfailure', (e) => setStatus(`refused: ${e.detail.reason || 'wrong password'}`));
    return () => rfb.disconnect();
  }, [buildId, vm, password]);
  return (
    <div className="console" data-testid={`console-${vm}`} data-status={status}>
      <div className="console-head">Screen <small data-testid={`console-${vm}-status`}>{status}</small>
        <small> (also <code>kiln console {vm}</code>)</small></div>
      <div className="console-screen" ref={screen} />
    </div>
  );
}
