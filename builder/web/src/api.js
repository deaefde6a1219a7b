// The kiln serve API. The token comes from the page URL and goes in a header on every call.
const token = new URLSearchParams(window.location.search).get('token') || '';

async function call(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { 'X-Kiln-Token': token },
    body,
  });
  const v = await r.json();
  if (!r.ok) throw new Error(v.error || `HTTP ${r.status}`);
  return v;
}

const q = (name) => `?name=${encodeURIComponent(name)}`;

export const listManifests = () => call('GET', '/api/manifests');
export const readManifest = (name) => call('GET', '/api/manifest' + q(name));
export const saveManifest = (name, text) => call('PUT', '/api/manifest' + q(name), text);
export const check = (name, text) => call('POST', '/api/check' + q(name || 'manifest.yaml'), text);
export const toYaml = (doc, original) =>
  call('POST', '/api/yaml', JSON.stringify({ doc, original })).then((v) => v.text);

// Builds started from the page (kiln build --json in a child of kiln serve).
export const listBuilds = () => call('GET', '/api/builds').then((v) => v.builds);
export const startBuild = (name) => call('POST', '/api/builds' + q(name));
export const cancelBuild = (id) => call('POST', `/api/builds/${id}/cancel`);
export const resumeBuild = (id, vm) => call('POST', `/api/builds/${id}/resume?vm=${encodeURIComponent(vm)}`);
// EventSource cannot send headers: the token goes in the URL, as in the page's own.
export const buildEvents = (id) =>
  new EventSource(`/api/builds/${id}/events?token=${encodeURIComponent(token)}`);
// The consoles of a running build's VMs: [{vm, password}] (the password comes here, under the
// token header, never in a URL).
export const buildConsoles = (id) => call('GET', `/api/builds/${id}/consoles`).then((v) => v.consoles);
// A WebSocket cannot send headers either: the token goes in the URL, the VNC password does not.
export const consoleUrl = (id, vm) => {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${window.location.host}/api/builds/${id}/console?vm=${encodeURIComponent(vm)}&token=${encodeURIComponent(token)}`;
};

// s11-builds: a build's log files (listBuilds above gives, oldest first: [{id, manifest, module,
// status, phase, startedAt, endedAt, durationMs, vms: [{name, phase, paused}]}]).
// [{name, size}]: each VM's log and serial log, boot-command screenshots, events.jsonl.
export const buildLogFiles = (id) => call('GET', `/api/builds/${id}/logs`).then((v) => v.files);
// An <img> or a download link cannot send headers: the token goes in the URL.
export const buildLogUrl = (id, name, download = false) =>
  `/api/builds/${id}/logs/${encodeURIComponent(name)}?token=${encodeURIComponent(token)}${download ? '&download=1' : ''}`;
