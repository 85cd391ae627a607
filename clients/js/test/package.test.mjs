// The npm package: importable by its name through the `exports` map (the
// client, the AI SDK transport at `herald-gateway/ai`, the backend SDK at
// `herald-gateway/server`), and `npm pack`
// ships the modules, their types and the README — nothing else.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

test('imports by package name', async () => {
  const pkg = await import('herald-gateway'); // self-reference through `exports`
  assert.equal(typeof pkg.HeraldClient, 'function');
  assert.equal(typeof pkg.HeraldClosedError, 'function');
  const json = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
  assert.equal(json.name, 'herald-gateway');
  assert.deepEqual(json.exports['.'], { types: './herald.d.ts', default: './herald.js' });
  const ai = await import('herald-gateway/ai');
  assert.equal(typeof ai.HeraldChatTransport, 'function');
  const server = await import('herald-gateway/server');
  assert.equal(typeof server.Herald, 'function');
  assert.equal(typeof server.verifyWebhook, 'function');
  assert.deepEqual(json.exports['./server'], { types: './server.d.ts', default: './server.js' });
});

test('npm pack ships the module, its types and the README', () => {
  const out = execFileSync('npm', ['pack', '--dry-run', '--json'], { cwd: root, encoding: 'utf8' });
  const files = JSON.parse(out)[0].files.map((f) => f.path).sort();
  assert.deepEqual(files, ['README.md', 'ai.d.ts', 'ai.js', 'herald.d.ts', 'herald.js', 'package.json', 'server.d.ts', 'server.js']);
  const js = readFileSync(path.join(root, 'herald.js'));
  console.log(`herald.js: ${js.length} bytes, ${gzipSync(js, { level: 9 }).length} gzipped`);
});

test('the README\'s backend quick start typechecks against herald-gateway/server', () => {
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
  const start = readme.indexOf("```ts\nimport http from 'node:http';");
  assert.ok(start >= 0, 'the quick start is in the README');
  const code = readme.slice(start + 6, readme.indexOf('```', start + 6));
  const dir = mkdtempSync(path.join(root, 'test', '.readme-'));
  try {
    writeFileSync(path.join(dir, 'quickstart.ts'), code);
    writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({ extends: '../tsconfig.json', files: ['quickstart.ts'] }));
    execFileSync(path.join(root, 'node_modules/.bin/tsc'), ['-p', dir], { cwd: root, encoding: 'utf8' });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
