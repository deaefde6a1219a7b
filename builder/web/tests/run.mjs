// Browser tests for `kiln serve`, in headless Chromium driven by playwright-core.
// Usage: node builder/web/tests/run.mjs <path to kiln binary>
// Set KILN_SCREENSHOTS=<dir> to save screenshots of the form, the YAML tab and the build view.
// The build tests boot a real VM (QEMU TCG where KVM cannot run Linux): they need
// qemu-system-x86_64 and write modules to a temporary folder. KILN_ONLY=build runs only them.
// Ends with a line `N passed, N failed`; skips loudly when chromium or playwright-core is absent.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, copyFileSync, readFileSync, rmSync, cpSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../../..');
const kiln = resolve(process.argv[2] || join(repo, 'target/release/kiln'));
const CHROMIUM = '/usr/bin/chromium';

function skip(why) {
  console.error(`SKIP: ${why}`);
  console.log('0 passed, 0 failed');
  process.exit(0);
}
if (!existsSync(CHROMIUM)) skip(`${CHROMIUM} is absent (Debian package chromium)`);
if (!existsSync(kiln)) skip(`no kiln binary at ${kiln}`);
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch {
  skip('playwright-core is not installed: run `npm ci` in builder/web');
}

// A folder with the validation corpus and the examples.
const corpusDir = join(repo, 'builder/tests/manifests');
const work = mkdtempSync(join(tmpdir(), 'kiln-serve-web-'));
const corpus = readdirSync(corpusDir).filter((n) => /\.ya?ml$/.test(n)).sort();
for (const n of corpus) copyFileSync(join(corpusDir, n), join(work, n));
if (existsSync(join(corpusDir, 'assets'))) {
  cpSync(join(corpusDir, 'assets'), join(work, 'assets'), { recursive: true });
}
for (const n of readdirSync(join(repo, 'examples')).filter((n) => n.endsWith('.yaml'))) {
  copyFileSync(join(repo, 'examples', n), join(work, `example-${n}`));
}

// hello with a handbuild step before its reboot: the build pauses there until Continue.
const hello = readFileSync(join(repo, 'examples/hello.yaml'), 'utf8');
const HANDBUILD = `      - name: by-hand
        type: handbuild
        handbuild:
          instructions: "Check the motd by hand, then press Continue."
      - name: restart
`;
writeFileSync(join(work, 'hello-pause.yaml'), hello.replace('      - name: restart\n', HANDBUILD));
// hello pausing at its first step: a build to cancel at a point where cancelling is prompt (a
// cancel while the guest boots waits for the boot timeout: see the README).
writeFileSync(join(work, 'hello-cancel.yaml'), hello.replace('    provisioners:\n', `    provisioners:
      - name: wait
        type: handbuild
        handbuild: { instructions: "Cancel me." }
`));
// The same, its VM kept out of every console view.
writeFileSync(join(work, 'hello-hidden.yaml'), readFileSync(join(work, 'hello-cancel.yaml'), 'utf8')
  .replace('  - name: hello\n', '  - name: hello\n    invisible: true\n'));
// A build that fails when it starts: its parent module does not exist.
writeFileSync(join(work, 'orphan.yaml'), `vms:
  - name: child
    source:
      buildRef: { name: no-such-module }
    resources: { cpu: 1, memory: 512Mi }
`);
const modules = join(work, 'modules');
const server = spawn(kiln, ['serve', work, '--listen', '127.0.0.1:0', '--output', modules],
  { stdio: ['ignore', 'pipe', 'inherit'] });
const url = await new Promise((ok, fail) => {
  let buf = '';
  const t = setTimeout(() => fail(new Error('kiln serve printed no URL in 10 s')), 10000);
  server.stdout.on('data', (d) => {
    buf += d;
    const m = buf.match(/kiln serve: (http:\/\/\S+)/);
    if (m) { clearTimeout(t); ok(m[1]); }
  });
  server.on('exit', (c) => fail(new Error(`kiln serve exited with ${c}`)));
});
const token = new URL(url).searchParams.get('token');
const base = new URL(url).origin;

async function api(method, path, body) {
  const r = await fetch(base + path, { method, headers: { 'X-Kiln-Token': token }, body });
  const v = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${v.error}`);
  return v;
}
// The canonical text of a manifest's meaning (what `kiln fmt` writes), or null if it does not parse.
async function meaning(name, text) {
  const v = await api('POST', `/api/check?name=${encodeURIComponent(name)}`, text);
  // The form edits mappings only: YAML that does not parse, or is not a mapping, blocks it.
  if (v.doc == null || typeof v.doc !== 'object' || Array.isArray(v.doc)) return null;
  return (await api('POST', '/api/yaml', JSON.stringify({ doc: v.doc }))).text;
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.setDefaultTimeout(10000);
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e)));
page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });

async function idle() {
  // Let pending requests start, then wait until none is in flight.
  await page.waitForTimeout(50);
  await page.waitForSelector('[data-testid="diag-count"][data-busy="0"]');
}
async function open(name) {
  await page.goto(url);
  await page.selectOption('[data-testid="manifest-picker"]', name);
  await page.waitForFunction((n) => document.querySelector('[data-testid="status"]')?.textContent === `opened ${n}`, name);
  await idle();
}
const yamlText = () => page.inputValue('[data-testid="yaml"]');
async function tab(t) {
  await page.click(`[data-testid="tab-${t}"]`);
  await page.waitForSelector(t === 'yaml' ? '[data-testid="yaml"]' : '[data-testid="form"], [data-testid="form-blocked"]');
  await idle();
}
function assert(c, msg) { if (!c) throw new Error(msg); }

const results = [];
async function test(name, fn) {
  const before = pageErrors.length;
  try {
    await fn();
    assert(pageErrors.length === before, `page errors: ${pageErrors.slice(before).join('; ')}`);
    results.push([name, null]);
    console.log(`ok   ${name}`);
  } catch (e) {
    results.push([name, e]);
    console.log(`FAIL ${name}: ${e.message}`);
  }
}

// Every corpus manifest: Visual -> YAML -> Visual -> YAML, with a no-op form edit, keeps its meaning.
const only = process.env.KILN_ONLY;
for (const n of only ? [] : [...corpus, "example-hello.yaml"]) {
  await test(`roundtrip ${n}`, async () => {
    const original = readFileSync(join(work, n), 'utf8');
    const want = await meaning(n, original);
    await open(n);
    if (want == null) {
      await page.waitForSelector('[data-testid="form-blocked"]');
      return;
    }
    await page.waitForSelector('[data-testid="form"]');
    // Edit the first VM's name in the form and put it back: the form rewrites the document.
    const nameInput = page.locator('input[data-path$="vms.0.name"]');
    if (await nameInput.count()) {
      const v = await nameInput.inputValue();
      await nameInput.fill(v + 'x');
      await idle();
      await nameInput.fill(v);
      await idle();
    }
    await tab('yaml');
    const first = await yamlText();
    assert((await meaning(n, first)) === want, `meaning changed after Visual -> YAML:\n${first}`);
    await tab('visual');
    await tab('yaml');
    const second = await yamlText();
    assert(second === first, 'a second Visual -> YAML changed the text');
  });
}

if (!only) await test('two-VM manifest built in the form alone passes kiln validate', async () => {
  await page.goto(url);
  await page.fill('[data-testid="new-name"]', 'pair-form');
  await page.click('[data-testid="new"]');
  await page.waitForSelector('[data-testid="form"]');
  await idle();
  await page.click('[data-testid="files-add"]');
  await idle();
  await page.fill('input[data-path="files.0.name"]', 'motd');
  await page.fill('textarea[data-path="files.0.inline"]', 'built by kiln\n');
  await page.click('[data-testid="subnets-add"]');
  await idle();
  await page.click('[data-testid="vms-add"]');
  await idle();
  await page.fill('input[data-path="vms.0.name"]', 'web');
  await page.fill('input[data-path="vms.1.name"]', 'db');
  await page.fill('input[data-path="vms.1.resources.memory"]', '2Gi');
  for (const i of [0, 1]) {
    await page.click(`[data-testid="nics-${i}-add"]`);
    await idle();
  }
  await page.click('[data-testid="steps-0-add"]');
  await idle();
  await page.selectOption('select[data-path="vms.0.provisioners.0.type"]', 'file');
  await idle();
  if (process.env.KILN_DEBUG) { await tab('yaml'); console.log(await yamlText()); await tab('visual'); }
  await page.fill('input[data-path="vms.0.provisioners.0.file.destination"]', '/etc/motd');
  await page.click('[data-testid="steps-1-add"]');
  await idle();
  await page.fill('textarea[data-path="vms.1.provisioners.0.shell.inline"]', 'echo hello\n');
  await idle();
  await page.waitForSelector('[data-testid="diag-count"][data-errors="0"]');
  if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'form.png'), fullPage: true });
  await tab('yaml');
  if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'yaml.png'), fullPage: true });
  await page.click('[data-testid="save"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="status"]')?.textContent === 'saved pair-form.yaml');
  const text = readFileSync(join(work, 'pair-form.yaml'), 'utf8');
  assert(text === await yamlText(), 'the saved file differs from the YAML tab');
  const v = spawnSync(kiln, ['validate', join(work, 'pair-form.yaml')], { encoding: 'utf8' });
  assert(v.status === 0, `kiln validate failed (${v.status}):\n${v.stdout}${v.stderr}\n${text}`);
  assert(/name: web/.test(text) && /name: db/.test(text) && /slot: 1/.test(text), `unexpected YAML:\n${text}`);
});

if (!only) await test('an edit in the YAML tab shows in the form', async () => {
  await open('example-hello.yaml');
  await tab('yaml');
  const text = await yamlText();
  const m = text.match(/memory: (\S+)/);
  assert(m, 'example has a memory field');
  await page.fill('[data-testid="yaml"]', text.replace(/memory: \S+/, 'memory: 3Gi'));
  await idle();
  await tab('visual');
  const v = await page.inputValue('input[data-path="vms.0.resources.memory"]');
  assert(v === '3Gi', `the form shows memory ${v}`);
});

if (!only) await test('an error appears on its field and on its YAML line', async () => {
  await open('example-hello.yaml');
  await page.fill('input[data-path="vms.0.resources.memory"]', 'lots');
  await page.waitForSelector('[data-testid="error-vms.0.resources.memory"]');
  assert(await page.locator('input[data-path="vms.0.resources.memory"].invalid').count() === 1, 'the input is not marked invalid');
  await tab('yaml');
  const text = await yamlText();
  const line = text.split('\n').findIndex((l) => l.includes('lots')) + 1;
  await page.waitForSelector(`[data-testid="gutter-err"][data-line="${line}"]`);
});

// Builds from the page.
const qemu = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64']).status === 0;
const buildStatus = (s, timeout) =>
  page.waitForSelector(`[data-testid="build"][data-status="${s}"]`, { timeout });
const reached = (id, timeout) => page.waitForSelector(`[data-testid="${id}"][data-reached="1"]`, { timeout });
async function startBuild(name) {
  await open(name);
  await page.click('[data-testid="build-start"]');
  await page.waitForSelector('[data-testid="build"]');
}
const logText = () => page.textContent('[data-testid="build-log"]');

await test('a build that fails shows why, and the Build button waits for it', async () => {
  await startBuild('orphan.yaml');
  await buildStatus('failed', 60000);
  await reached('build-phase-Failed');
  await reached('vm-child-phase-Failed');
  const err = await page.textContent('[data-testid="build-error"]');
  assert(/no-such-module/.test(err), `the error does not name the missing module: ${err}`);
  assert(/no-such-module/.test(await logText()), 'the log does not show the failure');
  assert(!existsSync(join(modules, 'orphan')), 'a failed build left a module');
});

if (!qemu) {
  console.error('SKIP: qemu-system-x86_64 is absent: the browser tests that build a VM did not run');
} else {
  await test('a build paused at a handbuild step shows its screen and is cancelled from the page', async () => {
    await startBuild('hello-cancel.yaml');
    await page.waitForSelector('[data-testid="handbuild-hello"]', { timeout: 300000 });
    // The VM's live screen: noVNC connected through the server, its canvas painted.
    await page.waitForSelector('[data-testid="console-hello"][data-status="connected"]', { timeout: 30000 }).catch(async (e) => {
      const st = await page.getAttribute('[data-testid="console-hello"]', 'data-status', { timeout: 1000 }).catch(() => 'no console');
      throw new Error(`the screen is ${st}: ${e.message}`);
    });
    await page.waitForFunction(() => {
      const c = document.querySelector('[data-testid="console-hello"] canvas');
      if (!c || !c.width || !c.height) return false;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const colours = new Set();
      for (let i = 0; i < d.length; i += 4 * 31) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      return colours.size > 1;
    }, null, { timeout: 30000 });
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'build-console.png'), fullPage: true });
    await page.click('[data-testid="build-cancel"]');
    await buildStatus('cancelled', 60000);
    const err = await page.textContent('[data-testid="build-error"]');
    assert(/cancelled/.test(err), `no cancel message: ${err}`);
    assert(await page.locator('[data-testid="handbuild-hello"]').count() === 0, 'the pause is still shown');
    assert(!existsSync(join(modules, 'hello-cancel')), 'a cancelled build left a module');
    assert(!(await page.isDisabled('[data-testid="build-start"]')), 'Build stays disabled after the cancel');
  });

  await test('an invisible VM has no console on the page', async () => {
    await startBuild('hello-hidden.yaml');
    await page.waitForSelector('[data-testid="handbuild-hello"]', { timeout: 300000 });
    const id = await api('GET', '/api/builds').then((v) => v.builds.find((b) => b.status === 'running').id);
    // Past a few of the page's polls: still nothing.
    await page.waitForTimeout(5000);
    const consoles = await api('GET', `/api/builds/${id}/consoles`);
    assert(consoles.consoles.length === 0, `an invisible VM is listed: ${JSON.stringify(consoles)}`);
    assert(await page.locator('[data-testid="console-hello"]').count() === 0, 'an invisible VM shows a console');
    const r = await fetch(`${base}/api/builds/${id}/console?vm=hello`, { headers: { 'X-Kiln-Token': token } });
    assert(r.status === 409 && /invisible/.test((await r.json()).error), `the console route answered ${r.status}`);
    await page.click('[data-testid="build-cancel"]');
    await buildStatus('cancelled', 60000);
  });

  await test('hello with a handbuild step: phases, output, pause, Continue, Succeeded, module', async () => {
    const t0 = Date.now();
    await startBuild('hello-pause.yaml');
    await reached('build-phase-Building', 30000);
    await reached('vm-hello-phase-SourceImporting', 30000);
    await reached('vm-hello-phase-Booting', 360000);
    await reached('vm-hello-phase-Provisioning', 300000);
    await page.waitForSelector('[data-testid="step-hello-0"][data-status="ok"]', { timeout: 120000 });
    // The pause: its instructions, the earlier steps done, the later ones waiting.
    await page.waitForSelector('[data-testid="handbuild-hello"]', { timeout: 180000 });
    const instr = await page.textContent('[data-testid="handbuild-hello-instructions"]');
    assert(instr === 'Check the motd by hand, then press Continue.', `instructions: ${instr}`);
    assert(await page.getAttribute('[data-testid="step-hello-1"]', 'data-status') === 'ok', 'greet is not done');
    assert(await page.getAttribute('[data-testid="step-hello-2"]', 'data-status') === 'running', 'the handbuild step is not running');
    assert(await page.getAttribute('[data-testid="step-hello-3"]', 'data-status') === 'pending', 'the reboot ran before Continue');
    // It stays paused until Continue.
    await page.waitForTimeout(1500);
    assert(await page.locator('[data-testid="handbuild-hello"]').count() === 1, 'the pause ended by itself');
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'build-paused.png'), fullPage: true });
    await page.click('[data-testid="continue-hello"]');
    await page.waitForSelector('[data-testid="handbuild-hello"]', { state: 'detached', timeout: 30000 });
    await page.waitForSelector('[data-testid="step-hello-2"][data-status="ok"]', { timeout: 30000 });
    await buildStatus('succeeded', 420000);
    for (const p of ['Pending', 'Networking', 'Building', 'CapturingDisks', 'Succeeded']) await reached(`build-phase-${p}`);
    for (const p of ['Pending', 'SourceImporting', 'Booting', 'Provisioning', 'ShuttingDown', 'DiskCaptured', 'Succeeded']) {
      await reached(`vm-hello-phase-${p}`);
    }
    for (let i = 0; i < 5; i++) {
      assert(await page.getAttribute(`[data-testid="step-hello-${i}"]`, 'data-status') === 'ok', `step ${i} is not ok`);
    }
    // The check step's own output, streamed from the guest.
    const log = await logText();
    assert(log.includes('hello| after reboot: hello from hello'), `no step output in the log:\n${log.slice(-2000)}`);
    assert(log.includes("==> step 3 'by-hand' (handbuild)"), 'the log does not show the handbuild step');
    // The module: shown, and on disk where the page says.
    assert(await page.textContent('[data-testid="build-module-name"]') === 'hello-pause', 'module name');
    const dir = await page.textContent('[data-testid="build-module-dir"]');
    assert(dir === join(modules, 'hello-pause'), `module dir ${dir}`);
    assert(existsSync(join(dir, 'module.yaml')), 'no module.yaml');
    const rec = readFileSync(join(dir, 'module.yaml'), 'utf8');
    const disk = rec.match(/file: (\S+\.qcow2)/);
    assert(disk && statSync(join(dir, disk[1])).size > 0, `no captured disk in module.yaml:\n${rec}`);
    await page.waitForSelector('[data-testid="module-disk-hello-root"]');
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'build.png'), fullPage: true });
    console.log(`     (built in ${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  });
}

// ---- s11-builds: the build page (several builds at once, timelines, step output, log files) ----
const builds = () => api('GET', '/api/builds').then((v) => v.builds);
const buildPage = (id) => page.waitForSelector(`[data-testid="build"][data-build-id="${id}"]`);
async function showBuild(id) {
  await page.click(`[data-testid="build-item-${id}"]`);
  await buildPage(id);
}
const rawGet = (path) => fetch(base + path, { headers: { 'X-Kiln-Token': token } });

await test('builds: the log-file route serves a build\'s files and nothing outside them', async () => {
  const failed = (await builds()).find((b) => b.manifest === 'orphan.yaml' && b.status === 'failed');
  assert(failed, 'no failed build of orphan.yaml to look at');
  const { files } = await api('GET', `/api/builds/${failed.id}/logs`);
  assert(files.some((f) => f.name === 'events.jsonl'), `no event log listed: ${JSON.stringify(files)}`);
  const r = await rawGet(`/api/builds/${failed.id}/logs/events.jsonl?download=1`);
  assert(r.status === 200 && /attachment/.test(r.headers.get('content-disposition')), `download: ${r.status}`);
  assert(/no-such-module/.test(await r.text()), 'the event log does not hold the failure');
  for (const [bad, status] of [['%2e%2e%2fevents.jsonl', 400], ['..%2F..%2Fmodules', 400], ['%2Fetc%2Fpasswd', 400],
    ['.hidden', 400], ['nothing.log', 404]]) {
    const b = await rawGet(`/api/builds/${failed.id}/logs/${bad}`);
    assert(b.status === status, `${bad}: ${b.status}, not ${status}`);
  }
  const noToken = await fetch(`${base}/api/builds/${failed.id}/logs/events.jsonl`);
  assert(noToken.status === 403, `without the token: ${noToken.status}`);
  assert((await rawGet('/api/builds/99999/logs')).status === 404, 'a build that is not there');
});

if (qemu) {
  await test('builds: a finished build\'s page shows phase durations, a step\'s output and its logs to download', async () => {
    const done = (await builds()).filter((b) => b.module === 'hello-pause' && b.status === 'succeeded').pop();
    assert(done, 'no succeeded build of hello-pause.yaml (the test above) to look at');
    await page.goto(url);
    await showBuild(done.id);
    for (const p of ['Booting', 'Provisioning', 'ShuttingDown']) {
      const ms = Number(await page.getAttribute(`[data-testid="vm-hello-phase-${p}"]`, 'data-duration-ms'));
      assert(ms > 0, `phase ${p} has no duration (${ms})`);
    }
    const when = await page.textContent('[data-testid="vm-hello-phase-Booting"]');
    assert(/\d+\.\d s · \d+\.\d s/.test(when), `the Booting segment does not show its start and duration: ${when}`);
    assert(/took \d+\.\d s/.test(await page.textContent('[data-testid="step-hello-1-duration"]')), 'no step duration');
    // Steps start closed (none failed); the check step opens on a click and shows its output.
    assert(await page.locator('[data-testid="step-hello-4-output"]').count() === 0, 'a step that did not fail is open');
    await page.click('[data-testid="step-hello-4-toggle"]');
    assert(await page.getAttribute('[data-testid="step-hello-4-toggle"]', 'aria-expanded') === 'true', 'aria-expanded');
    const out = await page.textContent('[data-testid="step-hello-4-output"]');
    assert(out.includes('after reboot: hello from hello'), `the check step's output: ${out}`);
    // The logs: each file a download link whose body is the file.
    await page.waitForSelector('[data-testid="log-file-hello.log"]');
    const href = await page.getAttribute('[data-testid="log-file-hello.log"]', 'href');
    const r = await fetch(base + href);
    assert(r.status === 200 && /attachment/.test(r.headers.get('content-disposition')), `download ${href}: ${r.status}`);
    assert((await r.text()).includes('after reboot: hello from hello'), 'the downloaded VM log lacks the step output');
    const ev = await fetch(base + await page.getAttribute('[data-testid="log-file-events.jsonl"]', 'href'));
    assert((await ev.text()).includes('"event":"stepFinished"'), 'the build log lacks its events');
    assert(await page.locator('[data-testid="log-file-hello-serial.log"]').count() === 1, 'no serial log listed');
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'build-page.png'), fullPage: true });
  });

  await test('builds: two builds run at once, both pause, both are cancelled from their pages', async () => {
    const pausing = readFileSync(join(work, 'hello-cancel.yaml'), 'utf8');
    writeFileSync(join(work, 'two-a.yaml'), pausing);
    writeFileSync(join(work, 'two-b.yaml'), pausing);
    await startBuild('two-a.yaml');
    const a = Number(await page.getAttribute('[data-testid="build"]', 'data-build-id'));
    await startBuild('two-b.yaml');
    const b = Number(await page.getAttribute('[data-testid="build"]', 'data-build-id'));
    assert(a !== b, 'the second build did not start');
    // A second build of a running manifest is refused: both would write one module.
    const again = await fetch(`${base}/api/builds?name=two-b.yaml`, { method: 'POST', headers: { 'X-Kiln-Token': token } });
    const msg = (await again.json()).error;
    assert(again.status === 409 && /two-b/.test(msg), `a second build of two-b.yaml: ${again.status} ${msg}`);
    const running = (await builds()).filter((x) => x.status === 'running').map((x) => x.id);
    assert(running.includes(a) && running.includes(b), `not both running: ${running}`);
    // Both reach their pause; the list says so.
    await page.waitForSelector('[data-testid="handbuild-hello"]', { timeout: 400000 });
    await page.waitForSelector(`[data-testid="build-item-${a}"][data-paused="1"]`, { timeout: 400000 });
    await page.waitForSelector(`[data-testid="build-item-${b}"][data-paused="1"]`);
    // Each build's page has its own VM's screen. (Waited for: a screen closed while it is still
    // connecting makes noVNC log an error.)
    const screen = '[data-testid="console-hello"][data-status="connected"]';
    await page.waitForSelector(screen, { timeout: 30000 });
    await showBuild(a);
    await page.waitForSelector('[data-testid="handbuild-hello"]');
    await page.waitForSelector(screen, { timeout: 30000 });
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'builds-two.png'), fullPage: true });
    await page.click('[data-testid="build-cancel"]');
    await buildStatus('cancelled', 60000);
    await showBuild(b);
    assert(await page.getAttribute('[data-testid="build"]', 'data-status') === 'running', 'b stopped with a');
    await page.waitForSelector(screen, { timeout: 30000 });
    await page.click('[data-testid="build-cancel"]');
    await buildStatus('cancelled', 60000);
    await page.waitForSelector(`[data-testid="build-item-${a}"][data-status="cancelled"]`);
    assert(!existsSync(join(modules, 'two-a')) && !existsSync(join(modules, 'two-b')), 'a cancelled build left a module');
  });

  await test('builds: a failed build\'s page opens its failed step and shows its boot-command screenshots', async () => {
    // A bootstrap VM booted through firmware (kiln's GRUB) whose boot command only waits: kiln
    // saves the screen before the first key, after the wait and at the end (about a minute).
    // Its step fails: its logs, screenshots too, are then kept with the failed builds'.
    writeFileSync(join(work, 'boot-shots.yaml'), `vms:
  - name: shot
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [busybox] }
    resources: { cpu: 1, memory: 512Mi }
    boot: firmware
    bootWait: 1s
    bootCommand:
      - "<wait1>"
    provisioners:
      - name: check
        type: shell
        shell:
          inline: "cat /proc/cmdline; exit 3"
`);
    await startBuild('boot-shots.yaml');
    await buildStatus('failed', 420000);
    await page.waitForSelector('[data-testid="step-shot-0"][data-status="failed"]');
    const out = await page.textContent('[data-testid="step-shot-0-output"]');
    assert(/BOOT_IMAGE=/.test(out), `the failed step is not open with its output: ${out}`);
    await reached('vm-shot-phase-BootCommand');
    await page.waitForSelector('[data-testid="screenshots-shot"]', { timeout: 15000 });
    const shots = await page.$$eval('[data-testid="screenshots-shot"] img', (imgs) => imgs.map((i) => i.alt));
    assert(shots.length === 3, `screenshots shown: ${shots}`);
    // Each is a real image the route served (the browser decoded it), the screen's size.
    const sizes = await page.$$eval('[data-testid="screenshots-shot"] img', (imgs) => Promise.all(imgs.map(
      (i) => (i.complete ? Promise.resolve() : new Promise((ok) => { i.onload = ok; i.onerror = ok; })).then(() => i.naturalWidth))));
    assert(sizes.every((w) => w >= 640), `screenshot widths: ${sizes}`);
    const r = await fetch(base + await page.getAttribute('[data-testid="log-file-shot-boot-02.png"]', 'href'));
    const body = Buffer.from(await r.arrayBuffer());
    assert(r.headers.get('content-type') === 'image/png' && body.subarray(1, 4).toString() === 'PNG', 'the download is no PNG');
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'build-boot-command.png'), fullPage: true });
  });
}

await browser.close();
server.kill();
rmSync(work, { recursive: true, force: true });
const failed = results.filter(([, e]) => e).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
