// Browser tests for `kiln serve`, in headless Chromium driven by playwright-core.
// Usage: node builder/web/tests/run.mjs <path to kiln binary>
// Set KILN_SCREENSHOTS=<dir> to save screenshots of the form, the YAML tab and the build view.
// The build tests boot a real VM (QEMU TCG where KVM cannot run Linux): they need
// qemu-system-x86_64 and write modules to a temporary folder. KILN_ONLY=build runs only them;
// KILN_ONLY=term runs the terminal tests (and the build tests).
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

// s11-term: a terminal into a running clone's VM. A module an earlier test built (hello-pause),
// else hello built here with the CLI; its clone started with the CLI (`kiln clone`, `kiln run`);
// the terminal mounted alone at `#/terminal/<clone>/<vm>`. KILN_ONLY=term runs only these.
if (qemu && (!only || only === 'term')) {
  await test('terminal: a clone\'s VM answers in the page, a bad token is refused', async () => {
    const t0 = Date.now();
    const kilnEnv = { ...process.env, KILN_NO_INTERNET: 'true' };
    let mod = 'hello-pause';
    if (!existsSync(join(modules, mod, 'module.yaml'))) {
      mod = 'hello';
      const b = spawnSync(kiln, ['build', 'examples/hello.yaml', '--output', modules],
        { cwd: repo, env: kilnEnv, stdio: ['ignore', 'ignore', 'inherit'], timeout: 1200000 });
      assert(b.status === 0, `kiln build examples/hello.yaml failed (${b.status})`);
    }
    const clones = join(work, 'clones');
    const prefix = `term${process.pid}`;
    const c = spawnSync(kiln, ['clone', mod, '--name', prefix, '--modules', modules, '--clones', clones],
      { cwd: repo, env: kilnEnv, encoding: 'utf8' });
    assert(c.status === 0, `kiln clone failed: ${c.stderr}`);
    const clone = `${prefix}-1`;
    const run = spawn(kiln, ['run', clone, '--clones', clones], { cwd: repo, env: kilnEnv, stdio: ['ignore', 'ignore', 'inherit'] });
    try {
      // A clone that is not running: a clear message, no shell.
      // The hash is read when the page loads: a fresh page for each (goto with only a new hash
      // would not load it again).
      await page.goto('about:blank');
      await page.goto(`${url}#/terminal/no-such-clone/hello`);
      await page.waitForSelector('.terminal[data-state="error"]');
      const says = await page.textContent('.terminal-status');
      assert(/not running/.test(says), `the status says: ${says}`);

      await page.goto('about:blank');
      await page.goto(`${url}#/terminal/${clone}/hello`);
      await page.waitForSelector('.terminal[data-state="connected"]', { timeout: 60000 });
      // The login shell's prompt (the guest may still be booting: the server waits for its agent).
      const screenText = () => page.evaluate(() =>
        [...document.querySelectorAll('.xterm-rows > div')].map((r) => r.textContent.replace(/\s+$/, '')));
      await page.waitForFunction(() => /root@\S*[#$]/.test(document.querySelector('.xterm-rows')?.textContent || ''),
        null, { timeout: 300000 });
      await page.click('.terminal-screen');
      await page.keyboard.type('echo $((6*7))');
      await page.keyboard.press('Enter');
      await page.waitForFunction(() => [...document.querySelectorAll('.xterm-rows > div')]
        .some((r) => r.textContent.trim() === '42'), null, { timeout: 30000 }).catch(async (e) => {
        throw new Error(`no 42 on the screen: ${(await screenText()).filter(Boolean).join(' | ')}: ${e.message}`);
      });
      if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'terminal.png'), fullPage: true });
      // The WebSocket takes the token like every route: a wrong one never opens (the browser
      // logs the refusal as a console error, which is this check's own, not the page's).
      const logged = pageErrors.length;
      const bad = await page.evaluate((path) => new Promise((done) => {
        const ws = new WebSocket(`ws://${location.host}${path}?token=not-the-token`, 'kiln-terminal');
        ws.onopen = () => { ws.close(); done('opened'); };
        ws.onerror = () => done('refused');
      }), `/api/clones/${clone}/vms/hello/terminal`);
      assert(bad === 'refused', `a bad token: ${bad}`);
      pageErrors.splice(logged);
      // `exit` ends the shell and the page says how.
      await page.keyboard.type('exit 3');
      await page.keyboard.press('Enter');
      await page.waitForSelector('.terminal[data-state="ended"]', { timeout: 30000 });
      const end = await page.textContent('.terminal-status');
      assert(/exit code 3/.test(end), `the status says: ${end}`);
      console.log(`     (terminal test in ${((Date.now() - t0) / 1000).toFixed(0)} s)`);
    } finally {
      run.kill('SIGINT');
      await new Promise((ok) => { if (run.exitCode != null) ok(); else run.on('exit', ok); });
    }
  });
}

await browser.close();
server.kill();
rmSync(work, { recursive: true, force: true });
const failed = results.filter(([, e]) => e).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
