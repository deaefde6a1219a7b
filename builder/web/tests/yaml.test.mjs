// Unit tests of the YAML editor's parts that need no browser: the schema lookups behind
// completion and hover, the cursor's place in the tree, and the comment-keeping patch.
// Run: node --test builder/web/tests/yaml.test.mjs (KILN_BIN=<kiln> also checks the real schema).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { keysAt, valuesAt, keyInfo, nodesAt } from '../src/yaml/schema.js';
import { completionContext, keyAt } from '../src/yaml/cursor.js';
import { patchYaml } from '../src/yaml/patch.js';
import { parse } from 'yaml';

// A schema shaped like `kiln schema`'s: $refs into $defs, a root anyOf, a oneOf, enums.
const schema = {
  anyOf: [{ $ref: '#/$defs/Manifest' }, { $ref: '#/$defs/Envelope' }],
  $defs: {
    Manifest: {
      type: 'object',
      properties: {
        vms: { type: 'array', description: 'the VMs', items: { $ref: '#/$defs/VM' } },
        timeout: { type: 'string', description: 'bounds the build' },
      },
    },
    Envelope: {
      type: 'object',
      properties: {
        kind: { enum: ['VirtualMachineBuild'], description: 'the kind' },
        spec: { $ref: '#/$defs/Manifest', description: 'the body' },
      },
    },
    VM: {
      type: 'object',
      required: ['name'],
      properties: {
        name: { type: ['string', 'number', 'boolean'], description: 'the name' },
        invisible: { type: 'boolean', description: 'no console' },
        boot: { enum: ['auto', 'direct'], description: 'how it boots' },
        env: {
          description: 'variables',
          oneOf: [
            { type: 'object', additionalProperties: { type: 'string' } },
            { type: 'array', items: { type: 'string' } },
          ],
        },
        steps: { type: 'array', items: { $ref: '#/$defs/Step' } },
      },
    },
    Step: {
      anyOf: [
        { type: 'object', properties: { shell: { type: 'string', description: 'a script' } } },
        { type: 'object', properties: { reboot: { type: 'boolean' } } },
      ],
    },
  },
};

test('keys at the root are the union of the anyOf branches', () => {
  assert.deepEqual(keysAt(schema, []).map((k) => k.name), ['vms', 'timeout', 'kind', 'spec']);
});

test('$refs are followed through lists and the envelope', () => {
  const vm = keysAt(schema, ['vms', 0]);
  assert.deepEqual(vm.map((k) => k.name), ['name', 'invisible', 'boot', 'env', 'steps']);
  assert.equal(vm.find((k) => k.name === 'name').required, true);
  assert.deepEqual(keysAt(schema, ['spec', 'vms', 3]).map((k) => k.name), vm.map((k) => k.name));
  assert.deepEqual(keysAt(schema, ['vms', 0, 'steps', 0]).map((k) => k.name), ['shell', 'reboot']);
});

test('enum, const and boolean values', () => {
  assert.deepEqual(valuesAt(schema, ['vms', 0, 'boot']), ['auto', 'direct']);
  assert.deepEqual(valuesAt(schema, ['vms', 0, 'invisible']), [true, false]);
  assert.deepEqual(valuesAt(schema, ['kind']), ['VirtualMachineBuild']);
  assert.deepEqual(valuesAt(schema, ['vms', 0, 'name']), []);
});

test('a key\'s description and type', () => {
  assert.deepEqual(keyInfo(schema, ['vms']), { description: 'the VMs', type: 'list of object' });
  assert.deepEqual(keyInfo(schema, ['vms', 0, 'boot']), { description: 'how it boots', type: 'one of: auto, direct' });
  assert.equal(keyInfo(schema, ['vms', 0, 'env']).type, 'object | list of string');
  assert.equal(keyInfo(schema, ['spec']).description, 'the body');
  assert.equal(keyInfo(schema, ['nope']), null);
  assert.deepEqual(nodesAt(schema, ['vms', 0, 'nope']), []);
});

test('a recursive $ref does not loop', () => {
  const loop = { $ref: '#/$defs/A', $defs: { A: { $ref: '#/$defs/A' } } };
  assert.deepEqual(keysAt(loop, []), []);
});

const manifest = `vms:
  - name: a
    reso
    source: { blank: true }
    steps:
      - type: sh
      - na
    bootstrap: { distro: deb }
`;

test('the cursor\'s place: a half-typed key in a list item\'s mapping', () => {
  const at = completionContext(manifest, manifest.indexOf('reso') + 4);
  assert.equal(at.word, 'reso');
  assert.deepEqual(at.keys.path, ['vms', 0]);
  assert.deepEqual(at.keys.siblings, ['name', 'source', 'steps', 'bootstrap']);
  assert.equal(at.value, null);
});

test('the cursor\'s place: values, block and flow', () => {
  assert.deepEqual(completionContext(manifest, manifest.indexOf('sh\n') + 2).value.path, ['vms', 0, 'steps', 0, 'type']);
  assert.deepEqual(completionContext(manifest, manifest.indexOf('deb') + 3).value.path, ['vms', 0, 'bootstrap', 'distro']);
  // A word alone in a list item may start a key or be a value.
  const item = completionContext(manifest, manifest.indexOf('na\n') + 2);
  assert.deepEqual(item.keys.path, ['vms', 0, 'steps', 1]);
  assert.deepEqual(item.value.path, ['vms', 0, 'steps', 1]);
  assert.deepEqual(completionContext('vm', 2).keys.path, []);
});

test('the key under the pointer', () => {
  const at = keyAt(manifest, manifest.indexOf('distro') + 2);
  assert.deepEqual(at.path, ['vms', 0, 'bootstrap', 'distro']);
  assert.equal(manifest.slice(at.from, at.to), 'distro');
  assert.equal(keyAt(manifest, manifest.indexOf('blank: true') + 8), null);
});

const commented = `# top comment
vms:
  # the first VM
  - name: a # eol
    resources: { cpu: 1, memory: 1Gi } # res
    provisioners:
      # before step
      - name: s1
        type: shell # shell!
        shell: { inline: "echo hi" }
      # between steps
      - name: s2
        type: reboot
  # between VMs
  - name: b
    resources:
      cpu: 2 # two
      memory: 2Gi
# end
`;

test('a patch keeps every comment and changes only what changed', () => {
  const d = parse(commented);
  d.vms[0].resources.cpu = 3;
  d.vms[0].provisioners.push({ name: 's3', type: 'shell', shell: { inline: 'echo 3\necho 4\n' } });
  d.vms[1].resources.memory = '4Gi';
  const out = patchYaml(commented, d);
  for (const c of commented.match(/#.*$/gm)) assert.ok(out.includes(c), `lost ${c}:\n${out}`);
  assert.deepEqual(parse(out), d);
  assert.match(out, /resources: \{ cpu: 3, memory: 1Gi \} # res/);
  assert.match(out, /cpu: 2 # two\n {6}memory: 4Gi/);
});

test('a patch removing and inserting list items keeps the others\' comments with them', () => {
  const d = parse(commented);
  d.vms[0].provisioners.splice(0, 1);
  d.vms.unshift({ name: 'z' });
  const out = patchYaml(commented, d);
  assert.deepEqual(parse(out), d);
  assert.match(out, /# between steps\n {6}- name: s2/);
  // A comment before a list's first item belongs to the list: it stays at its top.
  assert.match(out, /# the first VM\n {2}- name: z\n {2}- name: a # eol\n/);
  assert.match(out, /resources: \{ cpu: 1, memory: 1Gi \} # res/);
  assert.ok(out.endsWith('memory: 2Gi\n# end\n'), out);
});

test('a string turning multi-line is written as a block', () => {
  const out = patchYaml('a:\n  script: ""\n', { a: { script: 'echo 1\necho 2\n' } });
  assert.equal(out, 'a:\n  script: |\n    echo 1\n    echo 2\n');
});

test('no change gives the text back byte for byte; unreadable text gives null', () => {
  assert.equal(patchYaml(commented, parse(commented)), commented);
  assert.equal(patchYaml('a: [1, 2\n', { a: 1 }), null);
});

const kiln = process.env.KILN_BIN;
test('the real schema (kiln schema) offers what the guide names', { skip: !(kiln && existsSync(kiln)) && 'KILN_BIN not set' }, () => {
  const r = spawnSync(kiln, ['schema'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const real = JSON.parse(r.stdout);
  const vm = keysAt(real, ['vms', 0]).map((k) => k.name);
  for (const k of ['name', 'source', 'resources', 'communicator', 'nics', 'provisioners']) assert.ok(vm.includes(k), k);
  assert.ok(valuesAt(real, ['vms', 0, 'provisioners', 0, 'type']).includes('shell'));
  assert.ok(valuesAt(real, ['spec', 'vms', 0, 'source', 'bootstrap', 'distro']).includes('debian'));
  assert.match(keyInfo(real, ['vms', 0, 'resources', 'cpu']).description, /vCPU/);
});

test('a moved list item keeps its comment and key order, whatever order the form gives its keys', () => {
  const text = `vms:
  - name: a
    provisioners:
      - name: one
        type: shell
        shell: { inline: "true" }
      # the second step
      - name: two
        type: reboot
      - name: three
        type: shell
        shell: { inline: "false" }
`;
  // The server's JSON has its keys sorted: the form's objects are in that order.
  const sorted = (v) => (Array.isArray(v) ? v.map(sorted)
    : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted(v[k])])) : v);
  const doc = sorted(parse(text));
  const steps = doc.vms[0].provisioners;
  [steps[0], steps[1]] = [steps[1], steps[0]];
  const out = patchYaml(text, doc);
  assert.ok(out, 'no patch');
  assert.deepEqual(parse(out), doc);
  assert.match(out, /# the second step\n {6}- name: two\n {8}type: reboot\n {6}- name: one\n {8}type: shell/);
});
