// Claude Code itself (@anthropic-ai/claude-code, pinned) in print mode
// against Sluice's Messages API, the real binary in front of its simulated
// upstream: `claude -p`, with `--output-format stream-json`, and a turn
// that calls a tool; a wrong key that it does not retry for minutes; and
// streams that break, after which it falls back to one whole request and
// raises rather than take a partial answer. It runs offline: its own HOME, telemetry, auto-update,
// error reporting and non-essential traffic off, the base URL Sluice's.
//
// Run: node --test tests/sdk-node/claude-code.test.mjs (Node 22 or later).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { ALPHA, startStack } from './stack.mjs';

const CLAUDE = join(dirname(fileURLToPath(import.meta.url)), 'node_modules', '.bin', 'claude');
let stack;
let home;

before(async () => {
  stack = await startStack();
  home = mkdtempSync(join(tmpdir(), 'sluice-claude-home-'));
});

after(async () => {
  await stack?.stop();
  if (home) rmSync(home, { recursive: true, force: true });
});

/** Runs `claude` with `args` in print mode; resolves to { code, stdout, stderr }. */
function claude(args, extraEnv = {}) {
  const env = {
    PATH: process.env.PATH,
    HOME: home,
    ANTHROPIC_BASE_URL: `${stack.base}/anthropic`,
    ANTHROPIC_AUTH_TOKEN: ALPHA,
    DISABLE_TELEMETRY: '1',
    DISABLE_AUTOUPDATER: '1',
    DISABLE_ERROR_REPORTING: '1',
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: '1',
    ...extraEnv,
  };
  return new Promise((resolve, reject) => {
    const child = spawn(CLAUDE, args, { cwd: home, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** The gateway's access-log lines (parsed) for the Messages API so far. */
function messageLogs() {
  return stack.gateway.lines
    .map((l) => {
      try {
        const v = JSON.parse(l);
        return { ...v, ...(v.fields ?? {}) };
      } catch {
        return undefined;
      }
    })
    .filter((v) => v && v.endpoint === 'messages');
}

async function simStats() {
  return (await fetch(`${stack.upstream}/sim/stats`)).json();
}

test('claude -p answers through Sluice, one stream per turn', async () => {
  const before = messageLogs().length;
  const r = await claude(['-p', 'Say hello']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'This is a simulated answer.');
  const logs = messageLogs().slice(before);
  assert.ok(logs.length >= 1, 'it went through the Messages API');
  for (const l of logs) {
    assert.equal(l.status, 200, JSON.stringify(l));
    assert.equal(l.stream, true, 'Claude Code streams');
    assert.ok(l.prompt_tokens > 0 && l.completion_tokens > 0, JSON.stringify(l));
  }
  assert.match((await simStats()).last_uri, /^\/anthropic\/v1\/messages\?beta=true$/);
});

test('stream-json output, with a tool call and its result', async () => {
  const r = await claude(['-p', 'What is the weather in Paris?', '--output-format', 'stream-json', '--verbose']);
  assert.equal(r.code, 0, r.stderr);
  const events = r.stdout
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l));
  const blocks = (type) =>
    events.filter((e) => e.type === type).flatMap((e) => e.message?.content ?? []);
  // The simulated upstream thinks, answers and calls Claude Code's first
  // tool; Claude Code answers with the tool's result, and the next turn ends.
  assert.ok(blocks('assistant').some((b) => b.type === 'thinking'), 'thinking came through');
  const call = blocks('assistant').find((b) => b.type === 'tool_use');
  assert.ok(call, 'a tool_use came through');
  assert.deepEqual(call.input, { city: 'Paris' });
  assert.ok(blocks('user').some((b) => b.type === 'tool_result' && b.tool_use_id === call.id));
  const result = events.at(-1);
  assert.equal(result.type, 'result');
  assert.equal(result.subtype, 'success');
  assert.equal(result.result, 'This is a simulated answer.');
});

test('a wrong key fails at once: x-should-retry: false stops its retries', async () => {
  const before = stack.gateway.lines.length;
  const started = performance.now();
  const r = await claude(['-p', 'Say hello'], { ANTHROPIC_AUTH_TOKEN: 'sk-not-a-tenant' });
  const took = performance.now() - started;
  assert.notEqual(r.code, 0);
  assert.match(r.stdout + r.stderr, /401/);
  assert.ok(took < 30_000, `${took} ms: no minutes of retries`);
  const refusals = stack.gateway.lines
    .slice(before)
    .filter((l) => l.includes('"invalid_api_key"'));
  assert.equal(refusals.length, 1, 'one request, not retried');
});

test('broken streams: one whole request last, and an error, never a partial answer', async () => {
  const before = messageLogs().length;
  const r = await claude(['-p', 'Say hello'], { ANTHROPIC_CUSTOM_HEADERS: 'x-sim-die-after: 4' });
  assert.notEqual(r.code, 0, r.stdout);
  assert.doesNotMatch(r.stdout, /This is a simulated answer/);
  const logs = messageLogs().slice(before);
  assert.ok(logs.length >= 2, JSON.stringify(logs));
  for (const l of logs) assert.equal(l.outcome, 'interrupted', JSON.stringify(l));
  assert.ok(logs.slice(0, -1).every((l) => l.stream === true), 'streams first');
  assert.equal(logs.at(-1).stream, false, 'then one whole request');
});
