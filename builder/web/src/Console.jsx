import { useEffect, useRef, useState } from 'react';
import RFB from '@novnc/novnc';
import * as api from './api.js';

// How often a running build is asked which of its VMs have a console (a VM gets one as it boots).
const POLL_MS = 2000;

// The consoles of a running build's VMs, by VM name: {vm: password}. Invisible VMs never have one.
export function useConsoles(build) {
  // Tagged with their build: a page switched to another build never hands one build's
  // password to the other's screen, not even for the render before this effect runs again.
  const [consoles, setConsoles] = useState({ id: null, map: {} });
  const id = build?.id;
  const running = build?.status === 'running';
  useEffect(() => {
    setConsoles({ id: null, map: {} });
    if (id == null || !running) return undefined;
    let stop = false;
    const poll = async () => {
      try {
        const list = await api.buildConsoles(id);
        if (stop) return;
        setConsoles((old) => {
          const next = Object.fromEntries(list.map((c) => [c.vm, c.password]));
          const same = old.id === id && Object.keys(next).length === Object.keys(old.map).length
            && Object.entries(next).every(([k, v]) => old.map[k] === v);
          return same ? old : { id, map: next };
        });
      } catch { /* the build ended meanwhile: the next state says so */ }
    };
    poll();
    const t = setInterval(poll, POLL_MS);
    return () => { stop = true; clearInterval(t); };
  }, [id, running]);
  return consoles.id === id ? consoles.map : {};
}

// How long after a lost connection the screen connects again (a guest reboot starts a fresh
// QEMU, whose VNC server is new).
const RETRY_MS = 2000;

// A VM's live screen: noVNC over the server's WebSocket, which carries the VM's VNC stream.
export default function Console({ buildId, vm, password }) {
  const screen = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    let rfb = null;
    let retry = null;
    let stopped = false;
    let refused = false;
    // Connects again only once the server lists the VM's console as answering, so a screen
    // that is down for a while (a reboot) costs no failed WebSocket.
    const later = () => {
      retry = setTimeout(async () => {
        try {
          const list = await api.buildConsoles(buildId);
          if (stopped) return;
          if (list.some((c) => c.vm === vm && c.password === password)) connect();
          else later();
        } catch { if (!stopped) later(); }
      }, RETRY_MS);
    };
    const connect = () => {
      setStatus('connecting');
      rfb = new RFB(screen.current, api.consoleUrl(buildId, vm), { credentials: { password } });
      rfb.scaleViewport = true;
      rfb.addEventListener('connect', () => setStatus('connected'));
      rfb.addEventListener('securityfailure', (e) => {
        refused = true;
        setStatus(`refused: ${e.detail.reason || 'wrong password'}`);
      });
      rfb.addEventListener('disconnect', () => {
        rfb = null;
        if (stopped || refused) return;
        setStatus('reconnecting');
        later();
      });
    };
    connect();
    return () => {
      stopped = true;
      clearTimeout(retry);
      rfb?.disconnect();
    };
  }, [buildId, vm, password]);
  return (
    <div className="console" data-testid={`console-${vm}`} data-status={status}>
      <div className="console-head">Screen <small data-testid={`console-${vm}-status`}>{status}</small>
        <small> (also <code>kiln console {vm}</code>)</small></div>
      <div className="console-screen" ref={screen} />
    </div>
  );
}
