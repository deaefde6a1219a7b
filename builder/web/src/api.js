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

// s11-yaml: the manifest's JSON Schema for the YAML editor (fetched once per page).
let schemaPromise = null;
export const schema = () => {
  schemaPromise ??= call('GET', '/api/schema').catch((e) => {
    schemaPromise = null;
    throw e;
  });
  return schemaPromise;
};

// s11-visual: the Visual editor.
// The manifest's JSON Schema for field help (served by s11-yaml's `/api/schema`); the route
// may answer with the schema itself or wrap it as `{schema}`.
export const getSchema = () => schema().then((v) => (v && v.schema) || v);

// s11-home: modules and clones.
const seg = (s) => encodeURIComponent(s);
export const listModules = () => call('GET', '/api/modules');
export const getModule = (name) => call('GET', `/api/modules/${seg(name)}`);
export const makeClone = (module) => call('POST', `/api/modules/${seg(module)}/clones`);
export const listClones = () => call('GET', '/api/clones');
export const getClone = (name) => call('GET', `/api/clones/${seg(name)}`);
export const startClone = (name) => call('POST', `/api/clones/${seg(name)}/start`);
export const stopClone = (name) => call('POST', `/api/clones/${seg(name)}/stop`);
export const deleteClone = (name) => call('DELETE', `/api/clones/${seg(name)}`);

// s11-term: the terminal in a running clone's VM. A WebSocket cannot send headers: the token
// goes in the URL, as for the console; `rows` and `cols` are the terminal's starting size.
export const terminalUrl = (clone, vm, rows, cols) => {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  const path = `/api/clones/${encodeURIComponent(clone)}/vms/${encodeURIComponent(vm)}/terminal`;
  return `${scheme}//${window.location.host}${path}?rows=${rows}&cols=${cols}&token=${encodeURIComponent(token)}`;
};

// s11-builds: a build's log files (listBuilds above gives, oldest first: [{id, manifest, module,
// status, phase, startedAt, endedAt, durationMs, vms: [{name, phase, paused}]}]).
// [{name, size}]: each VM's log and serial log, boot-command screenshots, events.jsonl.
export const buildLogFiles = (id) => call('GET', `/api/builds/${id}/logs`).then((v) => v.files);
// An <img> or a download link cannot send headers: the token goes in the URL.
export const buildLogUrl = (id, name, download = false) =>
  `/api/builds/${id}/logs/${encodeURIComponent(name)}?token=${encodeURIComponent(token)}${download ? '&download=1' : ''}`;
