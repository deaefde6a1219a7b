import { useEffect, useRef, useState } from 'react';
import { Terminal as XTerm } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import * as api from './api.js';
import './Terminal.css';

// What the status line says, by state.
const SAYS = {
  connecting: 'connecting…',
  connected: 'connected',
  closed: 'disconnected',
  refused: 'could not connect: the server refused the terminal (is the clone running? reload the page if its token changed)',
};

// A login shell in VM `vm` of the running clone `clone`: xterm.js over the server's
// WebSocket, which the VM's agent serves on a real terminal (Ctrl-C, full-screen programs,
// the window size). Binary messages carry the terminal's bytes; text messages carry JSON:
// a new size from here, an `error` or the shell's `exit` from the server.
export default function Terminal({ clone, vm }) {
  const screen = useRef(null);
  const [state, setState] = useState('connecting');
  const [detail, setDetail] = useState('');
  useEffect(() => {
    setState('connecting');
    setDetail('');
    const term = new XTerm({
      cursorBlink: true,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
      fontSize: 14,
      scrollback: 5000,
      screenReaderMode: false,
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(screen.current);
    try { fit.fit(); } catch { /* not laid out yet: the observer fits it */ }
    const ws = new WebSocket(api.terminalUrl(clone, vm, term.rows, term.cols), 'kiln-terminal');
    ws.binaryType = 'arraybuffer';
    let opened = false;
    let ended = false;
    const enc = new TextEncoder();
    const send = (data) => { if (ws.readyState === WebSocket.OPEN) ws.send(data); };
    ws.onopen = () => { opened = true; setState('connected'); term.focus(); };
    ws.onmessage = (e) => {
      if (typeof e.data !== 'string') {
        term.write(new Uint8Array(e.data));
        return;
      }
      let m = {};
      try { m = JSON.parse(e.data); } catch { return; }
      ended = true;
      if (m.error) { setState('error'); setDetail(m.error); }
      else if (m.exit) { setState('ended'); setDetail(m.exit); }
    };
    ws.onclose = () => {
      if (ended) return;
      setState(opened ? 'closed' : 'refused');
    };
    const onData = term.onData((s) => send(enc.encode(s)));
    // Bytes that are not UTF-8 text (some mouse reports): one char per byte.
    const onBinary = term.onBinary((s) => send(Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff)));
    const onResize = term.onResize(({ rows, cols }) => send(JSON.stringify({ rows, cols })));
    const observer = new ResizeObserver(() => {
      try { fit.fit(); } catch { /* hidden: nothing to fit */ }
    });
    observer.observe(screen.current);
    return () => {
      observer.disconnect();
      onData.dispose();
      onBinary.dispose();
      onResize.dispose();
      ws.onclose = null;
      ws.close();
      term.dispose();
    };
  }, [clone, vm]);

  let says = SAYS[state] || state;
  if (state === 'error') says = `no shell: ${detail}`;
  if (state === 'ended') says = `the shell ended (${detail})`;
  return (
    <section className="terminal" aria-label={`Terminal in ${clone}/${vm}`} data-state={state}>
      <header className="terminal-bar">
        <span className="terminal-name">{clone}/{vm}</span>
        <span className="terminal-status" role="status" aria-live="polite">{says}</span>
      </header>
      <div className="terminal-screen" ref={screen} />
    </section>
  );
}
