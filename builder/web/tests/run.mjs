// Browser tests for `kiln serve`, in headless Chromium driven by playwright-core.
// Usage: node builder/web/tests/run.mjs <path to kiln binary>
// Set KILN_SCREENSHOTS=<dir> to save screenshots of each page.
// The build tests boot a real VM (QEMU TCG where KVM cannot run Linux): they need
// qemu-system-x86_64 and write modules to a temporary folder. KILN_ONLY=build runs only them;
// KILN_ONLY=yaml|visual|home runs that block (with the build tests; home's module page holds
// the terminal's tests).
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
// A runtime folder of its own: clones started from the page have their sockets there, apart
// from other kiln runs on the host (clone names like hello-pause-1 are not unique).
const runDir = join(work, 'run');
const server = spawn(kiln, ['serve', work, '--listen', '127.0.0.1:0', '--output', modules, '--no-cache'],
  { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, KILN_RUN_DIR: runDir } });
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
// A server without `/api/schema` (before s11-yaml's route) answers 404: the form then has no
// help texts, which is no page error.
page.on('console', (m) => {
  if (m.type() === 'error' && !/\/api\/schema/.test(m.location()?.url || '')) pageErrors.push(m.text());
});

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
// The YAML tab is a CodeMirror editor: its text is read from the editor's state (CodeMirror
// renders only the lines in view), as EditorView.findFromDOM does; it is set by selecting all
// and typing, as a person pasting would.
const yamlText = () => page.evaluate(() => {
  const content = document.querySelector('[data-testid="yaml-editor"] .cm-content');
  const tile = content && (content.cmTile || content.cmView);
  const view = tile && (tile.root?.view || tile.rootView?.view);
  if (!view) throw new Error('no CodeMirror view in the YAML tab');
  return view.state.doc.toString();
});
async function setYaml(text) {
  await page.click('[data-testid="yaml-editor"] .cm-content');
  await page.keyboard.press('Control+A');
  await page.keyboard.insertText(text);
  await idle();
  const got = await yamlText();
  assert(got === text, `the editor holds other text than was typed:\n${got}`);
}
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
  await page.click('[data-testid="steps-0-add-shell"]');
  await idle();
  await page.selectOption('select[data-path="vms.0.provisioners.0.type"]', 'file');
  await idle();
  if (process.env.KILN_DEBUG) { await tab('yaml'); console.log(await yamlText()); await tab('visual'); }
  await page.fill('input[data-path="vms.0.provisioners.0.file.destination"]', '/etc/motd');
  await page.click('[data-testid="steps-1-add-shell"]');
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
  await setYaml(text.replace(/memory: \S+/, 'memory: 3Gi'));
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
  assert(text.includes('lots'), `the YAML does not hold the form's value:\n${text}`);
  // Underlined where the value is, with a marker in the gutter.
  await page.waitForSelector('.cm-line .cm-lintRange-error');
  const underlined = await page.textContent('.cm-lintRange-error');
  assert(underlined === 'lots', `the underline covers ${JSON.stringify(underlined)}`);
  await page.waitForSelector('.cm-gutter-lint .cm-lint-marker-error');
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
    await page.click('[data-testid="nav-edit"]');
    await page.waitForSelector('[data-testid="build-start"]:not([disabled])', { timeout: 10000 })
      .catch(() => { throw new Error('Build stays disabled after the cancel'); });
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

// s11-yaml: the YAML editor (CodeMirror): completion and hover from the schema, diagnostics
// underlined as you type, and comments kept across Visual/YAML switches. KILN_ONLY=yaml runs
// these alone (with the build tests, which always run).
if (!only || only === 'yaml') {
  const yamlTab = async (name, text) => {
    writeFileSync(join(work, name), text);
    await open(name);
    await tab('yaml');
  };
  // Presses `keys`, types `typed`, and returns the labels the completion list then offers.
  const typeForCompletion = async (keys, typed) => {
    for (const k of keys) await page.keyboard.press(k);
    await page.keyboard.type(typed);
    await page.waitForSelector('.cm-tooltip-autocomplete li[aria-selected="true"]');
    // CodeMirror takes no Enter or Tab in the first moments of a list (against accidental picks).
    await page.waitForTimeout(150);
    return page.locator('.cm-tooltip-autocomplete li .cm-completionLabel').allTextContents();
  };
  const noMemory = `vms:
  - name: vm1
    source:
      bootstrap: { distro: debian, suite: bookworm }
    resources:
      cpu: 1`;

  await test('YAML editor: a key completed from the schema, and the diagnostics follow', async () => {
    await yamlTab('yaml-complete.yaml', noMemory + '\n');
    await page.waitForSelector('[data-testid="diag-count"][data-errors="1"]');
    assert(/memory/.test(await page.textContent('[data-testid="yaml-diags"]')), 'the missing memory is not reported');
    // Type the start of a key on a new line under resources: the list offers it.
    await page.click('[data-testid="yaml-editor"] .cm-content');
    const offered = await typeForCompletion(['Control+End', 'Backspace', 'Enter'], 'mem');
    assert(offered[0] === 'memory', `the completion list offers ${JSON.stringify(offered)}`);
    // Its description is shown beside the list.
    await page.waitForSelector('.cm-completionInfo');
    assert(/memory/.test(await page.textContent('.cm-completionInfo')), 'no description for memory');
    await page.keyboard.press('Enter');
    await page.keyboard.type('2Gi');
    await idle();
    const text = await yamlText();
    assert(text === noMemory + '\n      memory: 2Gi', `the completed text:\n${text}`);
    await page.waitForSelector('[data-testid="diag-count"][data-errors="0"]');
    // Values too: an enum field offers its members (a new line under `- name: vm1` is
    // indented as the VM's keys).
    const values = await typeForCompletion(['Control+Home', 'ArrowDown', 'End', 'Enter'], 'boot: fi');
    assert(values.includes('firmware'), `the values offered for boot: ${JSON.stringify(values)}`);
    await page.keyboard.press('Tab');
    await idle();
    assert((await yamlText()).includes('\n    boot: firmware\n    source:'), `boot not completed:\n${await yamlText()}`);
  });

  await test('YAML editor: an error underlined on its line, its message on hover and in the list', async () => {
    await yamlTab('yaml-error.yaml', noMemory + '\n      memory: lots\n');
    await page.waitForSelector('.cm-line .cm-lintRange-error');
    const line = page.locator('.cm-line', { has: page.locator('.cm-lintRange-error') });
    assert(await line.count() === 1 && (await line.textContent()).includes('memory: lots'), `underlined: ${await line.allTextContents()}`);
    assert(await page.textContent('.cm-lintRange-error') === 'lots', 'the underline is not on the value');
    await page.waitForSelector('.cm-gutter-lint .cm-lint-marker-error');
    // The message kiln validate prints (file:line:column), in the list and on hover.
    const listed = await page.textContent('[data-testid="yaml-diags"] li.error');
    assert(/^yaml-error\.yaml:7:15: error: /.test(listed), `listed: ${listed}`);
    const v = spawnSync(kiln, ['validate', join(work, 'yaml-error.yaml')], { encoding: 'utf8', cwd: work });
    const first = `${v.stdout}${v.stderr}`.split('\n').find((l) => /: error: /.test(l)) || '';
    assert(first.endsWith(listed.split('\n')[0].replace(/^yaml-error\.yaml/, '')), `kiln validate says ${first}, the page ${listed}`);
    await page.hover('.cm-lintRange-error');
    await page.waitForSelector('.cm-tooltip-lint');
    const tip = await page.textContent('.cm-tooltip-lint');
    assert(tip.includes(listed.split('\n')[0]), `the hover says ${tip}`);
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'yaml-diagnostic.png'), fullPage: true });
    // The list jumps to the place.
    await page.mouse.move(0, 0);
    await page.click('[data-testid="yaml-diags"] li.error button');
    const at = await page.evaluate(() => {
      const sel = window.getSelection();
      return sel && sel.anchorNode ? sel.anchorNode.textContent : '';
    });
    assert(at.includes('lots'), `the cursor is at ${JSON.stringify(at)}`);
  });

  await test('YAML editor: hover on a key shows its description and type', async () => {
    await yamlTab('yaml-hover.yaml', noMemory + '\n      memory: 1Gi\n');
    // The middle of the word `cpu` on screen.
    const at = await page.evaluate(() => {
      const walker = document.createTreeWalker(document.querySelector('.cm-content'), NodeFilter.SHOW_TEXT);
      for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const i = n.textContent.indexOf('cpu');
        if (i < 0) continue;
        const r = document.createRange();
        r.setStart(n, i + 1);
        r.setEnd(n, i + 2);
        const b = r.getBoundingClientRect();
        return { x: b.x + b.width / 2, y: b.y + b.height / 2 };
      }
      return null;
    });
    assert(at, 'no `cpu` on screen');
    await page.mouse.move(at.x, at.y);
    await page.waitForSelector('[data-testid="yaml-hover"]');
    const help = await page.textContent('[data-testid="yaml-hover"]');
    assert(/cpu/.test(help) && /vCPUs/.test(help) && /integer/.test(help), `the hover says ${help}`);
  });

  await test('YAML editor: comments survive Visual -> YAML -> Visual -> YAML', async () => {
    const commented = `# top: a module with comments
vms:
  # the web VM
  - name: web # end of line
    source:
      bootstrap: { distro: debian, suite: bookworm } # the base
    resources: { cpu: 1, memory: 1Gi }
    provisioners:
      # before the first step
      - name: hello
        type: shell
        shell: { inline: "echo hi" } # inline
      # between steps
      - name: again
        type: shell
        shell: { inline: "echo again" }
  # between VMs
  - name: db
    source:
      bootstrap: { distro: debian, suite: bookworm }
    resources:
      cpu: 1 # one
      memory: 1Gi
# the end
`;
    writeFileSync(join(work, 'yaml-comments.yaml'), commented);
    await open('yaml-comments.yaml');
    const comments = commented.match(/#.*$/gm);
    const keeps = (text, when) => {
      for (const c of comments) assert(text.includes(c), `${when}: lost ${c}:\n${text}`);
    };
    await page.fill('input[data-path="vms.0.resources.cpu"]', '2');
    await idle();
    await page.click('[data-testid="steps-1-add-shell"]');
    await idle();
    await tab('yaml');
    let text = await yamlText();
    keeps(text, 'Visual -> YAML');
    assert(/resources: \{ cpu: 2, memory: 1Gi \}/.test(text), `cpu not changed in place:\n${text}`);
    const doc = await api('POST', '/api/check?name=yaml-comments.yaml', text);
    assert(doc.doc.vms[1].provisioners.length === 1, `no provisioner added to db:\n${text}`);
    await tab('visual');
    await page.fill('input[data-path="vms.1.resources.memory"]', '2Gi');
    await idle();
    await tab('yaml');
    text = await yamlText();
    keeps(text, 'Visual -> YAML -> Visual -> YAML');
    assert(/cpu: 1 # one\n\s+memory: 2Gi/.test(text), `memory not changed in place:\n${text}`);
    // What the form did not touch reads as before, line for line.
    assert(text.startsWith(commented.split('    resources:')[0]), `the text before the edits moved:\n${text}`);
  });
}

// s11-visual: the Visual editor laid out as the guide's sections (Files, Network, each VM as a
// collapsible card with Source, Resources, Communicator, Network Interfaces, Provisioners).
// KILN_ONLY=visual runs these (with the build tests, which KILN_ONLY does not skip).
const visualTests = !only || only.split(',').includes('visual');
const stepNames = (text) => [...text.matchAll(/^ {6}- name: (\S+)\n {8}type:/gm)].map((m) => m[1]);
const cardOpen = (i) => page.getAttribute(`[data-testid="vm-${i}"]`, 'data-open');
if (visualTests) {
  writeFileSync(join(work, 'visual-url.yaml'), `vms:
  - name: img
    source:
      url: https://images.example.org/disk.qcow2
      checksum: sha256:${'ab'.repeat(32)}
    cloudInit: {}
    resources: { cpu: 1, memory: 1Gi }
`);
  writeFileSync(join(work, 'visual-bad.yaml'), readFileSync(join(repo, 'examples/pair.yaml'), 'utf8')
    .replace(/(- name: client[\s\S]*?memory: )\S+/, '$1lots'));
  writeFileSync(join(work, 'visual-iso.yaml'), `vms:
  - name: installer
    source: { blank: true }
    isos:
      - url: https://cdimage.example.org/netinst.iso
    resources: { cpu: 2, memory: 2Gi }
    communicator: { type: ssh, sshPassword: pw }
  - name: plain
    source:
      bootstrap: { distro: debian, suite: bookworm }
    resources: { cpu: 1, memory: 1Gi }
files:
  - name: preseed.cfg
    inline: "d-i debian-installer/locale string en_US.UTF-8\\n"
  - name: ks.cfg
    inline: "text\\n"
httpDirectory:
  files:
    - name: preseed.cfg
`);
  // 20 VMs on one subnet, each with a NIC and two steps.
  const many = Array.from({ length: 20 }, (_, i) => `  - name: vm${i + 1}
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [curl] }
    resources: { cpu: 1, memory: 512Mi }
    nics:
      - { name: eth0, subnet: lab, ip: 10.9.0.${i + 10} }
    provisioners:
      - name: one
        type: shell
        shell: { inline: "echo one" }
      - name: two
        type: reboot
`).join('');
  writeFileSync(join(work, 'visual-twenty.yaml'), `vms:\n${many}network:\n  subnets:\n    - { name: lab, cidr: 10.9.0.0/24 }\n`);

  await test('visual: a two-VM manifest shows the guide\'s sections; cards collapse and expand', async () => {
    await open('example-pair.yaml');
    const h2 = await page.locator('[data-testid="form"] h2').allTextContents();
    for (const s of ['Files', 'Network', 'VMs']) assert(h2.some((t) => t.startsWith(s)), `no ${s} section: ${h2.join(', ')}`);
    for (const i of [0, 1]) {
      assert(await cardOpen(i) === '1', `card ${i} starts closed`);
      for (const sub of ['source', 'resources', 'communicator', 'nics', 'provisioners']) {
        await page.waitForSelector(`[data-testid="vm-${i}-${sub}"]`);
      }
    }
    await page.click('[data-testid="vm-0-toggle"]');
    assert(await cardOpen(0) === '0' && await cardOpen(1) === '1', 'the toggle did not close card 0 alone');
    assert(await page.getAttribute('[data-testid="vm-0-toggle"]', 'aria-expanded') === 'false', 'aria-expanded is not false');
    assert(await page.locator('[data-testid="vm-0-source"]').count() === 0, 'a closed card shows its body');
    const sum = await page.textContent('[data-testid="vm-0-summary"]');
    assert(/Bootstrap · 1 cpu · 512Mi memory · 2 steps/.test(sum), `summary: ${sum}`);
    await page.click('[data-testid="vms-collapse-all"]');
    assert(await cardOpen(0) === '0' && await cardOpen(1) === '0', 'collapse all left a card open');
    await page.click('[data-testid="vms-expand-all"]');
    assert(await cardOpen(0) === '1' && await cardOpen(1) === '1', 'expand all left a card closed');
    // The keyboard opens and closes a card too.
    await page.focus('[data-testid="vm-1-toggle"]');
    await page.keyboard.press('Enter');
    assert(await cardOpen(1) === '0', 'Enter on the header did not close the card');
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'visual.png'), fullPage: true });
    // Duplicate: a copy after the original, under a free name; Remove takes it away again.
    await page.click('[data-testid="vm-0-duplicate"]');
    await idle();
    assert(await page.inputValue('input[data-path="vms.1.name"]') === 'web-copy1', 'the copy is not second, named web-copy1');
    assert(await page.locator('[data-testid^="vm-"][data-open]').count() === 3, 'no third card');
    await page.click('[data-testid="vm-1-remove"]');
    await idle();
    assert(await page.locator('[data-testid^="vm-"][data-open]').count() === 2, 'the copy was not removed');
    assert(await cardOpen(1) === '0', 'card states did not follow their VMs');
  });

  await test('visual: the source picker switches Disk Image URL to Bootstrap in the YAML', async () => {
    await open('visual-url.yaml');
    assert(await page.getAttribute('[data-testid="source-0"]', 'data-kind') === 'url', 'the picker does not show url');
    assert(await page.inputValue('input[data-path="vms.0.source.url"]') === 'https://images.example.org/disk.qcow2', 'url field');
    await page.check('[data-testid="source-0-bootstrap"]');
    await idle();
    assert(await page.getAttribute('[data-testid="source-0"]', 'data-kind') === 'bootstrap', 'the picker did not switch');
    await page.fill('input[data-path="vms.0.source.bootstrap.packages"]', 'nginx curl');
    await idle();
    // Back to URL and again to Bootstrap: what each kind held comes back.
    await page.check('[data-testid="source-0-url"]');
    await idle();
    assert(await page.inputValue('input[data-path="vms.0.source.url"]') === 'https://images.example.org/disk.qcow2', 'the URL was not kept');
    await page.check('[data-testid="source-0-bootstrap"]');
    await idle();
    await tab('yaml');
    const text = await yamlText();
    assert(!/url:|checksum:/.test(text), `the URL source is still in the YAML:\n${text}`);
    assert(/bootstrap:\n\s+distro: debian\n\s+suite: bookworm\n\s+packages:\n\s+- nginx\n\s+- curl/.test(text), `no bootstrap source:\n${text}`);
    assert(/cloudInit: \{\}/.test(text), `cloudInit (a VM field, not the source's) was dropped:\n${text}`);
    await page.waitForSelector('[data-testid="diag-count"][data-errors="0"]');
  });

  await test('visual: provisioners reorder by button and by drag and drop', async () => {
    await open('example-hello.yaml');
    await tab('yaml');
    const before = stepNames(await yamlText());
    assert(before.length >= 3, `hello has ${before.length} steps`);
    await tab('visual');
    await page.click('[data-testid="steps-0-1-up"]');
    await idle();
    await tab('yaml');
    const up = stepNames(await yamlText());
    assert(JSON.stringify(up) === JSON.stringify([before[1], before[0], ...before.slice(2)]), `after up: ${up} (was ${before})`);
    await tab('visual');
    // The keyboard: focus a down button and press Enter.
    await page.focus('[data-testid="steps-0-0-down"]');
    await page.keyboard.press('Enter');
    await idle();
    await page.dragAndDrop('[data-testid="steps-0-2-drag"]', '[data-testid="steps-0-0"]');
    await idle();
    await tab('yaml');
    const dragged = stepNames(await yamlText());
    assert(JSON.stringify(dragged) === JSON.stringify([before[2], ...before.slice(0, 2), ...before.slice(3)]), `after down and drag: ${dragged} (was ${before})`);
  });

  await test('visual: an error shows on its field, in its card\'s summary, and the keyboard reaches it', async () => {
    await open('visual-bad.yaml');
    await page.waitForSelector('[data-testid="error-vms.1.resources.memory"]');
    assert(await page.locator('input[data-path="vms.1.resources.memory"].invalid').count() === 1, 'the input is not marked invalid');
    assert(await page.textContent('[data-testid="vm-1-errors"]') === '1 error', 'the card does not count its error');
    assert(await page.locator('[data-testid="vm-0-errors"]').count() === 0, 'the other card counts an error');
    await page.click('[data-testid="vms-collapse-all"]');
    assert(await page.textContent('[data-testid="vm-1-errors"]') === '1 error', 'the closed card does not count its error');
    // The first error: reached by Tab from the top of the form, opened, focused.
    await page.focus('[data-testid="form"]').catch(() => {});
    await page.evaluate(() => document.activeElement?.blur());
    await page.locator('[data-testid="form"]').evaluate((f) => { f.tabIndex = -1; f.focus(); });
    await page.keyboard.press('Tab');
    assert(await page.evaluate(() => document.activeElement?.dataset.testid) === 'first-error', 'Tab from the form top does not reach the first-error button');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.activeElement?.dataset.path === 'vms.1.resources.memory');
    assert(await cardOpen(1) === '1', 'the card with the error did not open');
    // Fixed on its field: the error and the count go.
    await page.keyboard.press('Control+A');
    await page.keyboard.type('1Gi');
    await idle();
    await page.waitForSelector('[data-testid="error-vms.1.resources.memory"]', { state: 'detached' });
    assert(await page.locator('[data-testid="vm-1-errors"]').count() === 0, 'the error count stayed');
    // An error at a field the form does not show (a second source kind) is listed on its card.
    await open('invalid-source-two.yaml');
    const other = await page.textContent('[data-testid="vm-0-unplaced"]');
    assert(/2 kinds/.test(other), `the card does not list the unplaced error: ${other}`);
  });

  await test('visual: 20 VMs open as one-line cards within a bound', async () => {
    await page.goto(url);
    const t0 = Date.now();
    await page.selectOption('[data-testid="manifest-picker"]', 'visual-twenty.yaml');
    await page.waitForSelector('[data-testid="vm-19"]');
    const shown = Date.now() - t0;
    await idle();
    assert(await page.locator('[data-testid^="vm-"][data-open="0"]').count() === 20, 'the 20 cards do not start closed');
    const sum = await page.textContent('[data-testid="vm-19-summary"]');
    assert(/Bootstrap · 1 cpu · 512Mi memory · 2 steps/.test(sum), `summary: ${sum}`);
    if (process.env.KILN_SCREENSHOTS) await page.screenshot({ path: join(process.env.KILN_SCREENSHOTS, 'visual-20-vms.png'), fullPage: true });
    const t1 = Date.now();
    await page.click('[data-testid="vms-expand-all"]');
    await page.waitForSelector('[data-testid="vm-19-provisioners"]');
    const expanded = Date.now() - t1;
    // An edit with every card open stays quick too.
    const t2 = Date.now();
    await page.fill('input[data-path="vms.19.resources.memory"]', '1Gi');
    await page.waitForFunction(() => document.querySelector('[data-testid="vm-19-summary"]')?.textContent.includes('1Gi memory'));
    const edited = Date.now() - t2;
    await idle();
    await page.click('[data-testid="vms-collapse-all"]');
    console.log(`     (20 VMs: shown in ${shown} ms, all expanded in ${expanded} ms, an edit shown in ${edited} ms; bounds 3000/3000/1000)`);
    assert(shown < 3000 && expanded < 3000 && edited < 1000, 'past the bound');
  });

  await test('visual: the File Delivery matrix on an ISO-install VM', async () => {
    await open('visual-iso.yaml');
    await page.waitForSelector('[data-testid="delivery-0"]');
    assert(await page.locator('[data-testid="delivery-1"]').count() === 0, 'a bootstrap VM shows the matrix');
    assert(await page.locator('[data-testid="source-0-use-ssh"]').count() === 0, 'an SSH VM is offered SSH');
    assert(await page.isChecked('[data-testid="delivery-0-preseed.cfg-http"]'), 'preseed.cfg is not shown over HTTP');
    assert(!(await page.isChecked('[data-testid="delivery-0-ks.cfg-floppy"]')), 'ks.cfg is shown on the floppy');
    // kiln makes no CD from files: the matrix offers no CD column.
    const heads = await page.locator('[data-testid="delivery-0"] thead th').allTextContents();
    assert(!heads.some((h) => /CD/.test(h)), `a CD column: ${heads}`);
    await page.check('[data-testid="delivery-0-ks.cfg-floppy"]');
    await idle();
    await page.uncheck('[data-testid="delivery-0-preseed.cfg-http"]');
    await idle();
    await page.check('[data-testid="delivery-0-ks.cfg-http"]');
    await idle();
    await tab('yaml');
    const text = await yamlText();
    assert(/ {4}floppy:\n {6}files:\n {8}- name: ks\.cfg\n/.test(text), `no floppy with ks.cfg:\n${text}`);
    assert(/httpDirectory:\n {2}files:\n {4}- name: ks\.cfg\n(?! {4}- name)/.test(text), `httpDirectory is not ks.cfg alone:\n${text}`);
    // Leaving ISO Install takes the install media (ISOs, floppy) with it.
    await tab('visual');
    await page.check('[data-testid="source-0-bootstrap"]');
    await idle();
    assert(await page.locator('[data-testid="delivery-0"]').count() === 0, 'the matrix stayed');
    await tab('yaml');
    const after = await yamlText();
    assert(!/floppy:|isos:|blank:/.test(after), `install media left after the switch:\n${after}`);
  });

  await test('visual: field help from the schema', async () => {
    // Before `/api/schema` is served, the test serves `kiln schema` itself in its place.
    const served = (await fetch(`${base}/api/schema`, { headers: { 'X-Kiln-Token': token } })).ok;
    const schema = spawnSync(kiln, ['schema'], { encoding: 'utf8' }).stdout;
    if (!served) await page.route('**/api/schema', (r) => r.fulfill({ status: 200, contentType: 'application/json', body: schema }));
    try {
      await open('example-hello.yaml');
      await page.waitForSelector('[data-testid="form"][data-help="1"]');
      const want = JSON.parse(schema).$defs.Resources.properties.memory.description;
      const help = page.locator('[data-testid="help-vms.0.resources.memory"]');
      assert(await help.textContent() === want, `help: ${await help.textContent()}`);
      assert(!(await help.isVisible()), 'the help shows before the field has focus');
      await page.focus('input[data-path="vms.0.resources.memory"]');
      assert(await help.isVisible(), 'the help does not show on focus');
      assert(await page.getAttribute('input[data-path="vms.0.resources.memory"]', 'aria-describedby') === 'help-vms.0.resources.memory', 'no aria-describedby');
      assert(/reboot/.test(await page.locator('[data-testid="steps-0-add-reboot"]').textContent()), 'no add button per step type');
    } finally {
      if (!served) await page.unroute('**/api/schema');
    }
  });
}

// ---- s11-home: the shell, the home page, recipes, modules and clones, keyboard, 20 VMs ----
// The module checks use hello-pause, which the build test above made (with qemu only).
if (!only || only === 'home') {
  const shots = process.env.KILN_SCREENSHOTS;
  const built = existsSync(join(modules, 'hello-pause', 'module.yaml'));
  const status = (text, timeout) =>
    page.waitForFunction((t) => document.querySelector('[data-testid="status"]')?.textContent === t, text, { timeout });

  await test('home: manifests, modules and recent builds, each linking to its page', async () => {
    await page.goto(url);
    await page.waitForSelector('[data-testid="home"]');
    await page.waitForSelector('[data-testid="manifest-link-example-hello.yaml"]');
    // The orphan build failed at the start of the build tests: it is listed with its outcome.
    await page.waitForSelector('[data-testid="home-builds"] [data-status="failed"]');
    if (built) {
      const row = '[data-testid="module-row-hello-pause"]';
      await page.waitForSelector(row);
      const cells = await page.locator(`${row} td`).allTextContents();
      assert(/MiB|GiB/.test(cells[1]) && /^[0-9a-f]{12}$/.test(cells[3]) && cells[5] === 'ready',
        `module row: ${JSON.stringify(cells)}`);
      await page.waitForSelector('[data-testid="home-builds"] [data-status="succeeded"]');
    }
    if (shots) await page.screenshot({ path: join(shots, 'home.png'), fullPage: true });
    // A build's entry opens its page; the manifest link opens the editor.
    await page.click('[data-testid="home-builds"] a >> nth=0');
    await page.waitForSelector('[data-testid="build"]');
    assert(/^#\/builds\/\d+$/.test(new URL(page.url()).hash), `build link went to ${page.url()}`);
    await page.click('[data-testid="nav-home"]');
    await page.click('[data-testid="manifest-link-example-hello.yaml"]');
    await status('opened example-hello.yaml');
    await page.waitForSelector('[data-testid="form"]');
  });

  await test('each recipe opens a new manifest in the editor that kiln validate passes', async () => {
    for (const id of ['single', 'pair', 'layered', 'iso']) {
      if (id === 'layered' && !built) continue;
      await page.goto(url);
      await page.check(`[data-testid="recipe-${id}"]`);
      if (id === 'layered') await page.selectOption('[data-testid="recipe-module"]', 'hello-pause');
      await page.fill('[data-testid="recipe-name"]', `recipe-${id}`);
      await page.click('[data-testid="recipe-create"]');
      await status(`new recipe-${id}.yaml (not saved yet)`);
      assert(new URL(page.url()).hash === `#/edit/recipe-${id}.yaml`, `the editor route is ${page.url()}`);
      await page.waitForSelector('[data-testid="form"]');
      await idle();
      const errs = await page.getAttribute('[data-testid="diag-count"]', 'data-errors');
      assert(errs === '0', `${id}: ${await page.textContent('[data-testid="diag-count"]')}`);
      await page.click('[data-testid="save"]');
      await status(`saved recipe-${id}.yaml`);
      const file = join(work, `recipe-${id}.yaml`);
      const v = spawnSync(kiln, ['validate', file], { encoding: 'utf8' });
      assert(v.status === 0, `${id}: kiln validate failed (${v.status}):\n${v.stdout}${v.stderr}`);
      if (id === 'layered') assert(/name: hello-pause/.test(readFileSync(file, 'utf8')), 'the layer is not on hello-pause');
    }
  });

  // The flow end to end: a recipe, edited in the Visual editor alone, built from the page.
  if (built) await test('a module made from a recipe in the Visual editor alone is built', async () => {
    await page.goto(url);
    await page.check('[data-testid="recipe-layered"]');
    await page.selectOption('[data-testid="recipe-module"]', 'hello-pause');
    await page.fill('[data-testid="recipe-name"]', 'recipe-built');
    await page.click('[data-testid="recipe-create"]');
    await page.waitForSelector('[data-testid="form"]');
    await idle();
    // Visual edits only: two vCPUs, and the step's script.
    await page.fill('input[data-path="vms.0.resources.cpu"]', '2');
    await idle();
    await page.fill('textarea[data-path="vms.0.provisioners.0.shell.inline"]', 'set -eu\ntest "$(nproc)" = 2\necho "from a recipe" > /etc/kiln-recipe\n');
    await idle();
    assert(await page.getAttribute('[data-testid="diag-count"]', 'data-errors') === '0', await page.textContent('[data-testid="diag-count"]'));
    const t0 = Date.now();
    await page.click('[data-testid="build-start"]');
    await page.waitForSelector('[data-testid="build"][data-status="succeeded"], [data-testid="build"][data-status="failed"]', { timeout: 900000 });
    assert(await page.getAttribute('[data-testid="build"]', 'data-status') === 'succeeded', `the build failed: ${await page.textContent('[data-testid="build"]')}`);
    const rec = readFileSync(join(modules, 'recipe-built', 'module.yaml'), 'utf8');
    assert(/buildRef/.test(rec) && /hello-pause/.test(rec) && /from a recipe/.test(rec), `module.yaml:\n${rec}`);
    console.log(`     (built in ${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  });

  await test('keyboard: Tab reaches the main controls, Ctrl+S saves, ? opens the help', async () => {
    writeFileSync(join(work, 'keys.yaml'), hello);
    await page.goto(`${url}#/edit/keys.yaml`);
    await status('opened keys.yaml');
    await idle();
    // From the top of the page: the skip link is the first stop.
    await page.focus('a.skip');
    const seen = new Set();
    for (let i = 0; i < 25; i++) {
      await page.keyboard.press('Tab');
      const id = await page.evaluate(() => document.activeElement?.getAttribute('data-testid'));
      if (id) seen.add(id);
    }
    for (const id of ['nav-home', 'nav-edit', 'manifest-picker', 'help-open', 'tab-visual', 'save', 'build-start']) {
      assert(seen.has(id), `Tab never reached ${id} (reached ${[...seen].join(', ')})`);
    }
    // The focus ring is drawn.
    await page.focus('[data-testid="save"]');
    const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
    assert(outline !== 'none', 'no visible focus on a button');
    // Ctrl+S from inside a form field saves the form's edit.
    await page.fill('input[data-path="vms.0.resources.memory"]', '3Gi');
    await idle();
    await page.focus('input[data-path="vms.0.resources.memory"]');
    await page.keyboard.press('Control+s');
    await status('saved keys.yaml');
    assert(/memory: 3Gi/.test(readFileSync(join(work, 'keys.yaml'), 'utf8')), 'Ctrl+S did not save the edit');
    // `?` in a field is typed, not a shortcut; outside one it opens the help.
    await page.evaluate(() => document.activeElement?.blur());
    await page.keyboard.press('?');
    await page.waitForSelector('[data-testid="help-dialog"][open]');
    await page.keyboard.press('Escape');
    await page.waitForSelector('[data-testid="help-dialog"]:not([open])', { state: 'attached' });
    await page.keyboard.press('h');
    await page.waitForSelector('[data-testid="home"]');
  });

  await test('a manifest with 20 VMs opens, stays responsive, and the header stays', async () => {
    const vm = (i) => `  - name: vm${i}
    source:
      bootstrap: { distro: debian, suite: bookworm, packages: [curl] }
    resources: { cpu: 1, memory: 512Mi }
    disks: [{ name: root, size: 4Gi }]
    provisioners:
      - name: hello
        type: shell
        shell: { inline: "echo vm${i}" }
`;
    writeFileSync(join(work, 'twenty.yaml'), `vms:\n${Array.from({ length: 20 }, (_, i) => vm(i + 1)).join('')}`);
    await page.goto(url);
    const t0 = Date.now();
    await page.selectOption('[data-testid="manifest-picker"]', 'twenty.yaml');
    // The Visual editor shows 20 VMs as closed cards; the last card's summary is there.
    await page.waitForSelector('[data-testid="vm-19"]', { state: 'attached', timeout: 30000 });
    const opened = Date.now() - t0;
    await idle();
    assert(await page.getAttribute('[data-testid="diag-count"]', 'data-errors') === '0', 'the 20-VM manifest has errors');
    // An edit of the last VM goes through the whole round trip (form -> YAML -> check).
    await page.click('[data-testid="vms-expand-all"]');
    const t1 = Date.now();
    await page.fill('input[data-path="vms.19.resources.memory"]', '1Gi');
    await idle();
    const edited = Date.now() - t1;
    console.log(`     (20 VMs: form shown in ${opened} ms, an edit checked in ${edited} ms)`);
    assert(opened < 15000 && edited < 10000, `slow: opened in ${opened} ms, edit in ${edited} ms`);
    await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
    const top = await page.evaluate(() => document.querySelector('header.top').getBoundingClientRect().top);
    assert(top === 0, `the header scrolled away (top ${top})`);
  });

  if (built) await test('module page: record, a clone made, started, running, stopped, deleted', async () => {
    await page.goto(`${url}#/modules/hello-pause`);
    await page.waitForSelector('[data-testid="module-name"]:text("hello-pause")');
    assert((await page.textContent('[data-testid="module-yaml"]')).includes('name: hello-pause'), 'no module.yaml text');
    assert((await page.textContent('[data-testid="module-manifest"]')).includes('handbuild'), 'no manifest text');
    await page.waitForSelector('[data-testid="module-disk-row-hello-root"]');
    assert(/"bootstrap"|distro/.test(await page.textContent('[data-testid="module-input-hello"]')), 'no inputs');
    await page.click('[data-testid="make-clone"]');
    const clone = '[data-testid="clone-hello-pause-1"]';
    await page.waitForSelector(`${clone}[data-state="stopped"]`);
    assert(existsSync(join(work, 'clones', 'hello-pause-1', 'clone.yaml')), 'the clone is not next to the modules folder');
    const t0 = Date.now();
    await page.click('[data-testid="clone-start-hello-pause-1"]');
    await page.waitForSelector(`${clone}[data-state="running"]`, { timeout: 120000 });
    // Its VM's terminal on the module page: a command typed there runs in the clone.
    await page.waitForSelector(`${clone} .terminal[data-state="connected"]`, { timeout: 120000 });
    const rows = `${clone} .xterm-rows`;
    await page.waitForFunction((sel) => /root@\S*[#$]/.test(document.querySelector(sel)?.textContent || ''), rows, { timeout: 300000 });
    await page.click(`${clone} .terminal-screen`);
    await page.keyboard.type('echo $((6*7))');
    await page.keyboard.press('Enter');
    await page.waitForFunction((sel) => [...document.querySelectorAll(`${sel} > div`)].some((r) => r.textContent.trim() === '42'), rows, { timeout: 30000 });
    if (shots) await page.screenshot({ path: join(shots, 'terminal.png'), fullPage: true });
    // The terminal's WebSocket takes the token like every route: a wrong one never opens (the
    // browser logs the refusal as a console error, which is this check's own); a clone that
    // is not running gets a clear error, not a shell.
    const logged = pageErrors.length;
    const ws = (path, tok) => page.evaluate(([p, t]) => new Promise((done) => {
      const w = new WebSocket(`ws://${location.host}${p}?rows=24&cols=80&token=${encodeURIComponent(t)}`, 'kiln-terminal');
      w.onmessage = (m) => { if (typeof m.data === 'string') { done(m.data); w.close(); } };
      w.onerror = () => done('refused');
      w.onclose = () => done('closed');
    }), [path, tok]);
    assert(await ws('/api/clones/hello-pause-1/vms/hello/terminal', 'not-the-token') === 'refused', 'a bad token opened the terminal');
    const none = await ws('/api/clones/no-such-clone/vms/hello/terminal', token);
    assert(/not running/.test(none), `a clone that is not running: ${none}`);
    pageErrors.splice(logged);
    // `exit` ends the shell, and the page says how.
    await page.click(`${clone} .terminal-screen`);
    await page.keyboard.type('exit 3');
    await page.keyboard.press('Enter');
    await page.waitForSelector(`${clone} .terminal[data-state="ended"]`, { timeout: 30000 });
    const end = await page.textContent(`${clone} .terminal-status`);
    assert(/exit code 3/.test(end), `the terminal's status says: ${end}`);
    // Really running: kiln exec reaches its VM where the page started it.
    const ex = spawnSync(kiln, ['exec', 'hello-pause-1/hello', '--wait-secs', '180', '--', 'cat', '/etc/kiln-hello'],
      { encoding: 'utf8', env: { ...process.env, KILN_RUN_DIR: runDir }, timeout: 200000 });
    assert(ex.status === 0 && /hello from/.test(ex.stdout), `kiln exec: ${ex.status}\n${ex.stdout}${ex.stderr}`);
    console.log(`     (clone running and answering in ${((Date.now() - t0) / 1000).toFixed(0)} s)`);
    if (shots) await page.screenshot({ path: join(shots, 'module.png'), fullPage: true });
    // Deleting a running clone is refused by the server, not only by the disabled button.
    const r = await fetch(`${base}/api/clones/hello-pause-1`, { method: 'DELETE', headers: { 'X-Kiln-Token': token } });
    assert(r.status === 409, `deleting a running clone answered ${r.status}`);
    await page.click('[data-testid="clone-stop-hello-pause-1"]');
    await page.waitForSelector(`${clone}[data-state="stopped"]`, { timeout: 60000 });
    await page.click('[data-testid="clone-delete-hello-pause-1"]');
    await page.click('[data-testid="clone-delete-confirm-hello-pause-1"]');
    await page.waitForSelector(clone, { state: 'detached', timeout: 30000 });
    assert(!existsSync(join(work, 'clones', 'hello-pause-1')), 'the clone folder is still there');
  });
}

// ---- s11-builds: the build page (several builds at once, timelines, step output, log files) ----
const builds = () => api('GET', '/api/builds').then((v) => v.builds);
const buildPage = (id) => page.waitForSelector(`[data-testid="build"][data-build-id="${id}"]`);
async function showBuild(id) {
  // From the list when the page shows it, else by the build's route.
  if (await page.locator(`[data-testid="build-item-${id}"]`).count()) await page.click(`[data-testid="build-item-${id}"]`);
  else await page.evaluate((b) => { window.location.hash = `#/builds/${b}`; }, id);
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
