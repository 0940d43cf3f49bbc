// Conformance of the official Anthropic Node SDK (@anthropic-ai/sdk) against
// Sluice's Messages API, the real binary in front of its simulated
// upstream: messages, streams whose final message equals the whole hit,
// tools and thinking, the error classes of Sluice's refusals, the retry
// wait of a 429 against retry-after-ms, and an interrupted stream raising.
// (A 413 is not here: Sluice closes the connection of a body declared too
// large, and Node's fetch reports the broken write, not the answer.)
//
// Run: node --test tests/sdk-node/anthropic.test.mjs (Node 22 or later).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';

import { ALPHA, A_LIMITED, BETA, startStack } from './stack.mjs';

const MODEL = 'deepseek-chat';
let stack;

before(async () => {
  stack = await startStack();
});

after(async () => {
  await stack?.stop();
});

const client = (opts = {}) =>
  new Anthropic({ baseURL: `${stack.base}/anthropic`, apiKey: ALPHA, maxRetries: 0, ...opts });

const msgs = (text) => [{ role: 'user', content: text }];

// A message as the API sent it: the stream helper adds fields of its own
// (`parsed_output`, `stop_details`) that no response carries.
const wire = (m) =>
  JSON.parse(JSON.stringify(m, (k, v) => (k === 'parsed_output' || k === 'stop_details' ? undefined : v)));

async function simCalls() {
  const r = await fetch(`${stack.upstream}/sim/stats`);
  return (await r.json()).calls;
}

test('create: a message with its text and usage', async () => {
  const m = await client().messages.create({ model: MODEL, max_tokens: 256, messages: msgs('node anthropic hello') });
  assert.equal(m.type, 'message');
  assert.deepEqual(
    m.content.map((b) => b.type),
    ['text'],
  );
  assert.equal(m.content[0].text, 'This is a simulated answer.');
  assert.equal(m.stop_reason, 'end_turn');
  assert.ok(m.usage.input_tokens > 0 && m.usage.output_tokens > 0);
});

test('auth token (Bearer) as Claude Code sends it', async () => {
  const c = new Anthropic({ baseURL: `${stack.base}/anthropic`, apiKey: null, authToken: ALPHA, maxRetries: 0 });
  const m = await c.messages.create({ model: MODEL, max_tokens: 16, messages: msgs('node bearer') });
  assert.ok(m.content[0].text);
});

test("a stream's final message equals the whole hit, and a streamed hit accumulates to it", async () => {
  const c = client();
  const body = { model: MODEL, max_tokens: 256, messages: msgs('node streamed') };
  const stream = c.messages.stream(body);
  let text = '';
  stream.on('text', (t) => {
    text += t;
  });
  const streamed = await stream.finalMessage();
  assert.equal(text, 'This is a simulated answer.');
  const { data: whole, response } = await c.messages.create(body).withResponse();
  assert.equal(response.headers.get('x-sluice-cache'), 'hit');
  assert.deepEqual(wire(whole), wire(streamed));
  const calls = await simCalls();
  const again = await c.messages.stream(body).finalMessage();
  assert.equal(await simCalls(), calls, 'served from the cache');
  assert.deepEqual(wire(again), wire(streamed));
});

test('tools and thinking, whole and streamed', async () => {
  const body = {
    model: MODEL,
    max_tokens: 2048,
    messages: msgs('node weather?'),
    thinking: { type: 'enabled', budget_tokens: 1024 },
    tools: [{ name: 'get_weather', description: 'weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }],
  };
  const streamed = await client().messages.stream(body).finalMessage();
  assert.deepEqual(
    streamed.content.map((b) => b.type),
    ['thinking', 'text', 'tool_use'],
  );
  assert.ok(streamed.content[0].thinking && streamed.content[0].signature);
  assert.deepEqual(streamed.content[2].input, { city: 'Paris' });
  assert.equal(streamed.stop_reason, 'tool_use');
  const whole = await client().messages.create(body);
  assert.deepEqual(wire(whole), wire(streamed));
});

test('count_tokens is forwarded each time', async () => {
  const calls = await simCalls();
  for (let i = 0; i < 2; i++) {
    const n = await client().messages.countTokens({ model: MODEL, messages: msgs('node count') });
    assert.ok(n.input_tokens > 0);
  }
  assert.equal(await simCalls(), calls + 2);
});

const errorCases = [
  ['401', () => client({ apiKey: 'sk-nobody' }), {}, Anthropic.AuthenticationError, 401, 'authentication_error'],
  ['400', () => client(), { max_tokens: 1.5 }, Anthropic.BadRequestError, 400, 'invalid_request_error'],
  ['403', () => client({ apiKey: BETA }), { model: 'claude-sonnet-4-5' }, Anthropic.PermissionDeniedError, 403, 'permission_error'],
];

for (const [name, make, extra, cls, status, type] of errorCases) {
  test(`error class for a ${name}`, async () => {
    const body = { model: MODEL, max_tokens: 16, messages: msgs('node errors'), ...extra };
    await assert.rejects(make().messages.create(body), (e) => {
      assert.ok(e instanceof cls, `${e}`);
      assert.equal(e.status, status);
      assert.equal(e.error.type, 'error');
      assert.equal(e.error.error.type, type);
      assert.ok(e.headers.get('x-sluice-error'));
      assert.equal(e.headers.get('x-should-retry'), 'false');
      return true;
    });
  });
}

test('a 404 under the Anthropic paths is NotFoundError', async () => {
  await assert.rejects(client().models.list(), (e) => {
    assert.ok(e instanceof Anthropic.NotFoundError, `${e}`);
    assert.equal(e.error.error.type, 'not_found_error');
    return true;
  });
});

test('an upstream that never answers is GatewayTimeoutError, not retried', async () => {
  const body = { model: MODEL, max_tokens: 16, messages: msgs('node hang') };
  const opts = { headers: { 'x-sim-hang': 'headers', 'cache-control': 'no-store' } };
  await assert.rejects(client({ maxRetries: 2 }).messages.create(body, opts), (e) => {
    assert.ok(e instanceof Anthropic.GatewayTimeoutError, `${e}`);
    assert.equal(e.error.error.type, 'timeout_error');
    assert.equal(e.headers.get('x-sluice-error'), 'upstream_timeout');
    assert.equal(e.headers.get('x-should-retry'), 'false');
    return true;
  });
});

test('a 401 is not retried', async () => {
  const started = performance.now();
  await assert.rejects(
    client({ apiKey: 'sk-nobody', maxRetries: 5 }).messages.create({ model: MODEL, max_tokens: 16, messages: msgs('node no retry') }),
    Anthropic.AuthenticationError,
  );
  assert.ok(performance.now() - started < 500, 'x-should-retry: false stops the retries');
});

test('a 429 is RateLimitError, and the retry waits retry-after-ms', async () => {
  const c = client({ apiKey: A_LIMITED });
  let refused;
  for (let i = 0; i < 3 && !refused; i++) {
    try {
      await c.messages.create({ model: MODEL, max_tokens: 16, messages: msgs(`node limited ${i}`) });
    } catch (e) {
      refused = e;
    }
  }
  assert.ok(refused instanceof Anthropic.RateLimitError, `${refused}`);
  assert.equal(refused.error.error.type, 'rate_limit_error');
  assert.equal(refused.headers.get('anthropic-ratelimit-requests-limit'), '60');
  assert.match(refused.headers.get('anthropic-ratelimit-requests-reset'), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
  const again = await c.messages.create({ model: MODEL, max_tokens: 16, messages: msgs('node limited again') }).catch((e) => e);
  assert.ok(again instanceof Anthropic.RateLimitError);
  const waitMs = Number(again.headers.get('retry-after-ms'));
  assert.ok(waitMs > 0 && waitMs <= 1000, `${waitMs}`);
  const started = performance.now();
  const m = await client({ apiKey: A_LIMITED, maxRetries: 1 }).messages.create({
    model: MODEL,
    max_tokens: 16,
    messages: msgs('node limited retried'),
  });
  const took = performance.now() - started;
  assert.ok(m.content[0].text);
  assert.ok(took >= waitMs * 0.8, `waited ${took} ms for ${waitMs} ms`);
  assert.ok(took < waitMs + 2000, `waited ${took} ms for ${waitMs} ms`);
});

test('an interrupted stream raises', async () => {
  const stream = client().messages.stream(
    { model: MODEL, max_tokens: 256, messages: msgs('node interrupted') },
    { headers: { 'x-sim-die-after': '4', 'cache-control': 'no-store' } },
  );
  await assert.rejects(stream.finalMessage(), (e) => {
    assert.ok(e instanceof Anthropic.APIError, `${e}`);
    return true;
  });
});
