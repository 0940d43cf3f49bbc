// Conformance: the OpenAI Node SDK and the Vercel AI SDK (with
// @ai-sdk/deepseek) pointed at Sluice.
//
// Every Sluice answer must look to each library exactly like DeepSeek's
// would: completions and streams parse, DeepSeek's usage fields come through,
// a cache hit cannot be told from a miss, each Sluice error raises the
// library's matching error, retries wait what `retry-after-ms` says, and a
// stream that breaks mid-way makes the library raise instead of handing back
// a partial answer.
//
// One simulated upstream and one gateway serve the whole file (stack.mjs).
// Runs with `node --test` on Node 22 and later (what the pinned majors need).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { createDeepSeek } from '@ai-sdk/deepseek';
import { APICallError, generateText, jsonSchema, streamText, tool } from 'ai';
import OpenAI from 'openai';

import { ALPHA, BETA, LIMITED, LIMITED_AI, LIMITED_AI_RETRY, startStack } from './stack.mjs';

globalThis.AI_SDK_LOG_WARNINGS = false;

const ANSWER = 'This is a simulated answer.';
const REASONING = 'Let me think about this.';
const NO_STORE = { 'cache-control': 'no-store' };

let stack;
before(async () => {
  stack = await startStack();
});
after(async () => {
  await stack?.stop();
});

const msgs = (text) => [{ role: 'user', content: text }];
// Each test asks its own questions, so no test meets another's cache entry.
const unique = (text) => `${text} ${randomUUID()}`;

const WEATHER_TOOL = {
  type: 'function',
  function: { name: 'get_weather', parameters: { type: 'object', properties: {} } },
};

/** The kinds of answer the simulator gives, as request fields. */
const KINDS = {
  text: { model: 'deepseek-chat' },
  reasoning: { model: 'deepseek-reasoner' },
  tool_call: { model: 'deepseek-chat', tools: [WEATHER_TOOL] },
};

/** Records each fetch a client makes: when it started, when headers came, status and headers. */
function recordingFetch() {
  const calls = [];
  const fetchFn = async (url, init) => {
    const call = { started: performance.now() };
    calls.push(call);
    const response = await fetch(url, init);
    call.answered = performance.now();
    call.status = response.status;
    call.headers = response.headers;
    return response;
  };
  return { calls, fetch: fetchFn };
}

// The calls a recording fetch saw were one 429 then a 200, and the retry
// waited what the 429's `retry-after-ms` said (measured).
function assertRetriedAsAsked(t, rec) {
  assert.deepEqual(
    rec.calls.map((x) => x.status),
    [429, 200],
    'refused once, then through on the first retry',
  );
  const asked = Number(rec.calls[0].headers.get('retry-after-ms'));
  const waited = rec.calls[1].started - rec.calls[0].answered;
  t.diagnostic(`retry-after-ms ${asked}, waited ${waited.toFixed(1)} ms`);
  assert.ok(asked > 0, 'the 429 said how long to wait');
  assert.ok(waited >= asked - 5, `waited ${waited.toFixed(0)} ms, asked ${asked} ms`);
  assert.ok(waited < asked + 2000, `waited ${waited.toFixed(0)} ms, asked ${asked} ms`);
}

function cacheOf(headers) {
  return typeof headers.get === 'function' ? headers.get('x-sluice-cache') : headers['x-sluice-cache'];
}

describe('openai', () => {
  const client = (key = ALPHA, opts = {}) =>
    new OpenAI({ baseURL: `${stack.base}/v1`, apiKey: key, maxRetries: 0, ...opts });

  /** What a client reads from a stream, assembled into one message. */
  function assemble(chunks) {
    assert.ok(chunks.length > 0, 'the stream had chunks');
    const first = chunks[0];
    const message = { role: undefined, content: '' };
    let reasoning = '';
    const toolCalls = [];
    let finishReason = null;
    let usage;
    for (const c of chunks) {
      assert.equal(c.id, first.id, 'every chunk has the same id');
      assert.equal(c.model, first.model);
      assert.equal(c.created, first.created);
      assert.equal(c.object, 'chat.completion.chunk');
      if (c.usage) {
        assert.equal(usage, undefined, 'one usage chunk');
        assert.deepEqual(c.choices, [], 'the usage chunk has no choices');
        usage = c.usage;
      }
      for (const choice of c.choices) {
        assert.equal(choice.index, 0);
        const d = choice.delta ?? {};
        if (d.role) message.role = d.role;
        if (d.content) message.content += d.content;
        if (d.reasoning_content) reasoning += d.reasoning_content;
        for (const tc of d.tool_calls ?? []) {
          const t = (toolCalls[tc.index] ??= { id: undefined, type: undefined, function: { name: '', arguments: '' } });
          if (tc.id) t.id = tc.id;
          if (tc.type) t.type = tc.type;
          if (tc.function?.name) t.function.name += tc.function.name;
          if (tc.function?.arguments) t.function.arguments += tc.function.arguments;
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    if (reasoning) message.reasoning_content = reasoning;
    if (toolCalls.length) message.tool_calls = toolCalls;
    return {
      id: first.id,
      model: first.model,
      created: first.created,
      system_fingerprint: first.system_fingerprint,
      message,
      finish_reason: finishReason,
      usage,
    };
  }

  /** A non-streamed completion in the shape `assemble` gives. */
  function whole(completion) {
    const m = completion.choices[0].message;
    const message = { role: m.role, content: m.content ?? '' };
    if (m.reasoning_content) message.reasoning_content = m.reasoning_content;
    if (m.tool_calls?.length) {
      message.tool_calls = m.tool_calls.map((t) => ({
        id: t.id,
        type: t.type,
        function: { name: t.function.name, arguments: t.function.arguments },
      }));
    }
    return {
      id: completion.id,
      model: completion.model,
      created: completion.created,
      system_fingerprint: completion.system_fingerprint,
      message,
      finish_reason: completion.choices[0].finish_reason,
      usage: completion.usage,
    };
  }

  /** Checks the answer the simulator gives for a kind of request. */
  function checkKind(kind, a) {
    assert.equal(a.message.role, 'assistant');
    assert.equal(a.model, KINDS[kind].model);
    if (kind === 'tool_call') {
      assert.equal(a.finish_reason, 'tool_calls');
      assert.equal(a.message.tool_calls.length, 1);
      assert.equal(a.message.tool_calls[0].function.name, 'get_weather');
      assert.deepEqual(JSON.parse(a.message.tool_calls[0].function.arguments), { city: 'Paris' });
    } else {
      assert.equal(a.finish_reason, 'stop');
      assert.equal(a.message.content, ANSWER);
    }
    if (kind === 'reasoning') assert.equal(a.message.reasoning_content, REASONING);
    else assert.equal(a.message.reasoning_content, undefined);
  }

  async function collect(stream) {
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    return chunks;
  }

  test('non-stream answer with DeepSeek usage fields', async () => {
    const r = await client().chat.completions.create({ model: 'deepseek-chat', messages: msgs(unique('hello')) });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0].message.content, ANSWER);
    assert.equal(r.choices[0].finish_reason, 'stop');
    const u = r.usage;
    assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    assert.ok(u.prompt_cache_hit_tokens > 0, 'prompt_cache_hit_tokens reaches the client');
    assert.equal(u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens, u.prompt_tokens);
    assert.equal(u.prompt_tokens_details.cached_tokens, u.prompt_cache_hit_tokens);
  });

  test('stream answer has no usage chunk unless asked', async () => {
    const chunks = await collect(
      await client().chat.completions.create({ model: 'deepseek-chat', messages: msgs(unique('stream')), stream: true }),
    );
    const a = assemble(chunks);
    checkKind('text', a);
    assert.equal(a.usage, undefined, 'no usage chunk');
    assert.ok(chunks.length > 2, 'the answer came in several chunks');
  });

  test('stream_options.include_usage: the usage chunk carries prompt_cache_hit_tokens / prompt_cache_miss_tokens', async () => {
    const messages = msgs(unique('stream usage'));
    const c = client();
    const chunks = await collect(
      await c.chat.completions.create(
        { model: 'deepseek-chat', messages, stream: true, stream_options: { include_usage: true } },
        { headers: NO_STORE },
      ),
    );
    const last = chunks.at(-1);
    assert.deepEqual(last.choices, []);
    const u = last.usage;
    assert.ok(u.total_tokens > 0);
    assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    assert.ok(u.prompt_cache_hit_tokens > 0);
    assert.equal(u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens, u.prompt_tokens);
    // The same question, not streamed, is metered identically.
    const r = await c.chat.completions.create({ model: 'deepseek-chat', messages }, { headers: NO_STORE });
    assert.deepEqual(u, r.usage);
  });

  test('tool calls, non-stream and stream', async () => {
    const r = await client().chat.completions.create({
      model: 'deepseek-chat',
      messages: msgs(unique('weather?')),
      tools: [WEATHER_TOOL],
    });
    const a = whole(r);
    checkKind('tool_call', a);
    assert.equal(a.message.tool_calls[0].id, 'call_sim_0');
    assert.equal(a.message.tool_calls[0].type, 'function');
    const chunks = await collect(
      await client().chat.completions.create({
        model: 'deepseek-chat',
        messages: msgs(unique('weather stream?')),
        tools: [WEATHER_TOOL],
        stream: true,
      }),
    );
    const s = assemble(chunks);
    checkKind('tool_call', s);
    assert.equal(s.message.tool_calls[0].id, 'call_sim_0');
    const argChunks = chunks.filter((c) => c.choices[0]?.delta?.tool_calls?.[0]?.function?.arguments);
    assert.ok(argChunks.length > 1, 'arguments arrive in pieces');
  });

  test('reasoning_content of deepseek-reasoner, on the message and on the deltas', async () => {
    const r = await client().chat.completions.create({ model: 'deepseek-reasoner', messages: msgs(unique('think')) });
    assert.equal(r.choices[0].message.reasoning_content, REASONING);
    assert.equal(r.choices[0].message.content, ANSWER);
    assert.equal(r.usage.completion_tokens_details.reasoning_tokens, 6);
    const chunks = await collect(
      await client().chat.completions.create({
        model: 'deepseek-reasoner',
        messages: msgs(unique('think stream')),
        stream: true,
      }),
    );
    const deltas = chunks.flatMap((c) => c.choices.map((ch) => ch.delta));
    assert.equal(deltas.map((d) => d.reasoning_content ?? '').join(''), REASONING);
    const firstContent = deltas.findIndex((d) => d.content);
    const lastReasoning = deltas.findLastIndex((d) => d.reasoning_content);
    assert.ok(lastReasoning < firstContent, 'reasoning comes before the answer');
    checkKind('reasoning', assemble(chunks));
  });

  test('a non-stream cache hit parses to exactly the miss', async () => {
    for (const [kind, fields] of Object.entries(KINDS)) {
      const body = { ...fields, messages: msgs(unique(`cached ${kind}`)) };
      const miss = await client().chat.completions.create(body).withResponse();
      assert.equal(miss.response.headers.get('x-sluice-cache'), 'miss', kind);
      const hit = await client().chat.completions.create(body).withResponse();
      assert.equal(hit.response.headers.get('x-sluice-cache'), 'hit', kind);
      assert.ok(hit.response.headers.get('age') !== null, 'a hit carries age');
      checkKind(kind, whole(hit.data));
      assert.deepEqual(hit.data, miss.data, kind);
    }
  });

  test('a stream cache hit reassembles to the miss, usage chunk included', async () => {
    for (const [kind, fields] of Object.entries(KINDS)) {
      const body = { ...fields, messages: msgs(unique(`cached stream ${kind}`)), stream: true };
      const withUsage = { ...body, stream_options: { include_usage: true } };
      const miss = await client().chat.completions.create(withUsage).withResponse();
      assert.equal(miss.response.headers.get('x-sluice-cache'), 'miss', kind);
      const missed = assemble(await collect(miss.data));
      checkKind(kind, missed);
      assert.ok(missed.usage.prompt_cache_hit_tokens > 0);

      const hit = await client().chat.completions.create(withUsage).withResponse();
      assert.equal(hit.response.headers.get('x-sluice-cache'), 'hit', kind);
      assert.deepEqual(assemble(await collect(hit.data)), missed, kind);

      const bare = await client().chat.completions.create(body).withResponse();
      assert.equal(bare.response.headers.get('x-sluice-cache'), 'hit', kind);
      assert.deepEqual(assemble(await collect(bare.data)), { ...missed, usage: undefined }, kind);
    }
  });

  test('cache across modes: stored from a stream, hit as non-stream', async () => {
    for (const [kind, fields] of Object.entries(KINDS)) {
      const body = { ...fields, messages: msgs(unique(`stream then whole ${kind}`)) };
      const requestId = `node-store-${randomUUID()}`;
      const miss = await client()
        .chat.completions.create(
          { ...body, stream: true, stream_options: { include_usage: true } },
          { headers: { 'x-request-id': requestId } },
        )
        .withResponse();
      assert.equal(miss.response.headers.get('x-sluice-cache'), 'miss', kind);
      const streamed = assemble(await collect(miss.data));
      const log = await stack.accessLog(requestId);
      assert.equal(log.outcome, 'ok');

      const hit = await client().chat.completions.create(body).withResponse();
      assert.equal(hit.response.headers.get('x-sluice-cache'), 'hit', kind);
      assert.equal(hit.data.object, 'chat.completion');
      assert.deepEqual(whole(hit.data), streamed, kind);
    }
  });

  test('cache across modes: stored from non-stream, hit as a stream', async () => {
    for (const [kind, fields] of Object.entries(KINDS)) {
      const body = { ...fields, messages: msgs(unique(`whole then stream ${kind}`)) };
      const miss = await client().chat.completions.create(body).withResponse();
      assert.equal(miss.response.headers.get('x-sluice-cache'), 'miss', kind);

      const hit = await client()
        .chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } })
        .withResponse();
      assert.equal(hit.response.headers.get('x-sluice-cache'), 'hit', kind);
      assert.deepEqual(assemble(await collect(hit.data)), whole(miss.data), kind);
    }
  });

  test('401 raises AuthenticationError', async () => {
    await assert.rejects(
      client('sk-wrong').chat.completions.create({ model: 'deepseek-chat', messages: msgs('x') }),
      (e) => {
        assert.ok(e instanceof OpenAI.AuthenticationError, `${e?.constructor?.name}: ${e}`);
        assert.equal(e.status, 401);
        assert.equal(e.code, 'invalid_api_key');
        assert.equal(e.type, 'authentication_error');
        return true;
      },
    );
  });

  test('403 raises PermissionDeniedError', async () => {
    await assert.rejects(
      client(BETA).chat.completions.create({ model: 'deepseek-reasoner', messages: msgs('x') }),
      (e) => {
        assert.ok(e instanceof OpenAI.PermissionDeniedError, `${e?.constructor?.name}: ${e}`);
        assert.equal(e.status, 403);
        assert.equal(e.code, 'model_not_allowed');
        assert.equal(e.type, 'permission_error');
        return true;
      },
    );
  });

  test('429 raises RateLimitError; with retries the client waits retry-after-ms and gets through', async (t) => {
    const body = { model: 'deepseek-chat', messages: msgs(unique('limited')) };
    await client(LIMITED).chat.completions.create(body, { headers: NO_STORE });
    await assert.rejects(client(LIMITED).chat.completions.create(body, { headers: NO_STORE }), (e) => {
      assert.ok(e instanceof OpenAI.RateLimitError, `${e?.constructor?.name}: ${e}`);
      assert.equal(e.status, 429);
      assert.equal(e.code, 'rate_limit_exceeded');
      assert.equal(e.type, 'rate_limit_error');
      assert.ok(Number(e.headers.get('retry-after')) >= 1);
      const ms = Number(e.headers.get('retry-after-ms'));
      assert.ok(ms > 0 && ms <= 1000, `retry-after-ms ${ms} for 60 requests a minute`);
      return true;
    });

    const rec = recordingFetch();
    const c = client(LIMITED, { maxRetries: 2, fetch: rec.fetch });
    const { data, response } = await c.chat.completions.create(body, { headers: NO_STORE }).withResponse();
    assert.equal(data.choices[0].message.content, ANSWER);
    assert.equal(response.status, 200);
    assertRetriedAsAsked(t, rec);
  });

  test('a stream broken mid-way throws while iterating', async () => {
    const body = { model: 'deepseek-chat', messages: msgs(unique('die')), stream: true };
    const stream = await client().chat.completions.create(body, { headers: { 'x-sim-die-after': '3' } });
    let text = '';
    await assert.rejects(
      (async () => {
        for await (const c of stream) text += c.choices[0]?.delta?.content ?? '';
      })(),
      (e) => {
        assert.ok(e instanceof OpenAI.APIError, `${e?.constructor?.name}: ${e}`);
        assert.equal(e.code, 'upstream_stream_interrupted');
        assert.equal(e.type, 'upstream_error');
        assert.match(e.message, /interrupted/);
        return true;
      },
    );
    assert.equal(text, 'This is ', 'the part sent before the break');
    // Nothing of it was cached.
    const again = await client().chat.completions.create(body).withResponse();
    assert.equal(again.response.headers.get('x-sluice-cache'), 'miss');
    assert.equal(assemble(await collect(again.data)).message.content, ANSWER);
  });

  test('a broken stream is aborted after its error event, not ended', async () => {
    // What a client that ignores error events sees: a transfer that fails.
    const r = await fetch(`${stack.base}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${ALPHA}`, 'content-type': 'application/json', 'x-sim-die-after': '3' },
      body: JSON.stringify({ model: 'deepseek-chat', messages: msgs(unique('die raw')), stream: true }),
    });
    assert.equal(r.status, 200);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let received = '';
    await assert.rejects(async () => {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        received += decoder.decode(value, { stream: true });
      }
    }, 'reading the body fails');
    assert.match(received, /"code":"upstream_stream_interrupted"/);
    assert.doesNotMatch(received, /\[DONE\]/);
  });
});

describe('ai sdk (@ai-sdk/deepseek)', () => {
  // DeepSeek's own base URL has no /v1; Sluice serves both forms.
  const provider = (key = ALPHA, opts = {}) => createDeepSeek({ baseURL: stack.base, apiKey: key, ...opts });
  const model = (name = 'deepseek-chat', key = ALPHA, opts = {}) => provider(key, opts)(name);
  const weather = { get_weather: tool({ inputSchema: jsonSchema({ type: 'object', properties: {} }) }) };

  /** The call options for a kind of answer. */
  const callFor = (kind, prompt) => ({
    model: model(KINDS[kind].model),
    prompt,
    ...(kind === 'tool_call' ? { tools: weather } : {}),
    maxRetries: 0,
  });

  /** What a caller sees of a result, streamed or not. */
  async function view(result) {
    const [text, reasoningText, toolCalls, finishReason, usage, providerMetadata, response] = await Promise.all([
      result.text,
      result.reasoningText,
      result.toolCalls,
      result.finishReason,
      result.usage,
      result.providerMetadata,
      result.response,
    ]);
    const { responseObject, ...metadata } = providerMetadata.deepseek;
    return {
      text,
      reasoningText,
      toolCalls: toolCalls.map(({ toolCallId, toolName, input }) => ({ toolCallId, toolName, input })),
      finishReason,
      usage,
      deepseek: metadata,
      response: { id: response.id, modelId: response.modelId, timestamp: response.timestamp.getTime() },
      cache: cacheOf(response.headers),
      object: responseObject,
    };
  }

  function checkKind(kind, v) {
    assert.equal(v.response.modelId, KINDS[kind].model);
    if (kind === 'tool_call') {
      assert.equal(v.finishReason, 'tool-calls');
      assert.deepEqual(v.toolCalls, [{ toolCallId: 'call_sim_0', toolName: 'get_weather', input: { city: 'Paris' } }]);
      assert.equal(v.text, '');
    } else {
      assert.equal(v.finishReason, 'stop');
      assert.equal(v.text, ANSWER);
      assert.deepEqual(v.toolCalls, []);
    }
    assert.equal(v.reasoningText, kind === 'reasoning' ? REASONING : undefined);
  }

  /** DeepSeek's cache fields, as the AI SDK exposes them. */
  function checkUsage(v) {
    const u = v.usage;
    assert.ok(u.inputTokens > 0 && u.outputTokens > 0);
    assert.equal(u.totalTokens, u.inputTokens + u.outputTokens);
    assert.ok(v.deepseek.promptCacheHitTokens > 0, 'providerMetadata.deepseek.promptCacheHitTokens');
    assert.equal(v.deepseek.promptCacheHitTokens + v.deepseek.promptCacheMissTokens, u.inputTokens);
    assert.equal(u.inputTokenDetails.cacheReadTokens, v.deepseek.promptCacheHitTokens);
    assert.equal(u.inputTokenDetails.noCacheTokens, v.deepseek.promptCacheMissTokens);
    assert.equal(u.raw.prompt_cache_hit_tokens, v.deepseek.promptCacheHitTokens);
    assert.equal(u.raw.prompt_cache_miss_tokens, v.deepseek.promptCacheMissTokens);
  }

  /** The same answer, seen once as a miss and once as a hit: only the mode may differ. */
  function sameAnswer(hit, miss, kind) {
    const strip = ({ cache, object, ...rest }) => rest;
    assert.deepEqual(strip(hit), strip(miss), kind);
  }

  test('generateText: answer and DeepSeek cache usage', async () => {
    const v = await view(await generateText({ model: model(), prompt: unique('hello'), maxRetries: 0 }));
    checkKind('text', v);
    checkUsage(v);
    assert.equal(v.object, 'chat.completion');
  });

  test('streamText: answer and DeepSeek cache usage (include_usage)', async () => {
    const prompt = unique('stream');
    const r = streamText({ model: model(), prompt, maxRetries: 0, headers: NO_STORE });
    const pieces = [];
    for await (const piece of r.textStream) pieces.push(piece);
    assert.ok(pieces.length > 1, 'the text arrived in pieces');
    assert.equal(pieces.join(''), ANSWER);
    const v = await view(r);
    checkKind('text', v);
    checkUsage(v);
    assert.equal(v.object, 'chat.completion.chunk');
    // The same question, not streamed, is metered identically.
    const w = await view(await generateText({ model: model(), prompt, maxRetries: 0, headers: NO_STORE }));
    assert.deepEqual(v.usage, w.usage);
    assert.deepEqual(v.deepseek, w.deepseek);
  });

  test('tool calls, generateText and streamText', async () => {
    const g = await view(await generateText(callFor('tool_call', unique('weather?'))));
    checkKind('tool_call', g);
    const s = await view(streamText(callFor('tool_call', unique('weather stream?'))));
    checkKind('tool_call', s);
  });

  test('reasoning text of deepseek-reasoner, generateText and streamText', async () => {
    const g = await view(await generateText(callFor('reasoning', unique('think'))));
    checkKind('reasoning', g);
    assert.equal(g.usage.outputTokenDetails.reasoningTokens, 6);
    const r = streamText(callFor('reasoning', unique('think stream')));
    const kinds = [];
    for await (const part of r.fullStream) kinds.push(part.type);
    assert.ok(kinds.lastIndexOf('reasoning-delta') < kinds.indexOf('text-delta'), 'reasoning first');
    const s = await view(r);
    checkKind('reasoning', s);
    assert.equal(s.usage.outputTokenDetails.reasoningTokens, 6);
  });

  test('a generateText cache hit is the miss', async () => {
    for (const kind of Object.keys(KINDS)) {
      const prompt = unique(`cached ${kind}`);
      const miss = await view(await generateText(callFor(kind, prompt)));
      assert.equal(miss.cache, 'miss', kind);
      const hit = await view(await generateText(callFor(kind, prompt)));
      assert.equal(hit.cache, 'hit', kind);
      checkKind(kind, hit);
      checkUsage(hit);
      assert.deepEqual(hit, { ...miss, cache: 'hit' }, kind);
    }
  });

  test('a streamText cache hit is the miss', async () => {
    for (const kind of Object.keys(KINDS)) {
      const prompt = unique(`cached stream ${kind}`);
      const miss = await view(streamText(callFor(kind, prompt)));
      assert.equal(miss.cache, 'miss', kind);
      const hit = await view(streamText(callFor(kind, prompt)));
      assert.equal(hit.cache, 'hit', kind);
      checkKind(kind, hit);
      checkUsage(hit);
      assert.deepEqual(hit, { ...miss, cache: 'hit' }, kind);
    }
  });

  test('cache across modes: streamText stores, generateText hits, and the reverse', async () => {
    for (const kind of Object.keys(KINDS)) {
      const prompt = unique(`stream then whole ${kind}`);
      const requestId = `node-ai-store-${randomUUID()}`;
      const streamed = await view(streamText({ ...callFor(kind, prompt), headers: { 'x-request-id': requestId } }));
      assert.equal(streamed.cache, 'miss', kind);
      assert.equal((await stack.accessLog(requestId)).outcome, 'ok');
      const hit = await view(await generateText(callFor(kind, prompt)));
      assert.equal(hit.cache, 'hit', kind);
      checkKind(kind, hit);
      checkUsage(hit);
      sameAnswer(hit, streamed, kind);

      const prompt2 = unique(`whole then stream ${kind}`);
      const whole = await view(await generateText(callFor(kind, prompt2)));
      assert.equal(whole.cache, 'miss', kind);
      const hit2 = await view(streamText(callFor(kind, prompt2)));
      assert.equal(hit2.cache, 'hit', kind);
      checkKind(kind, hit2);
      checkUsage(hit2);
      sameAnswer(hit2, whole, kind);
    }
  });

  /** Asserts an APICallError with Sluice's error body. */
  const sluiceError = (status, code, type, retryable) => (e) => {
    assert.ok(APICallError.isInstance(e), `${e?.constructor?.name}: ${e}`);
    assert.equal(e.statusCode, status);
    assert.equal(e.isRetryable, retryable);
    assert.equal(e.data?.error?.code, code);
    assert.equal(e.data?.error?.type, type);
    assert.equal(e.message, e.data.error.message);
    return true;
  };

  test('401, 403 and 429 raise APICallError with the status and Sluice error', async () => {
    await assert.rejects(
      generateText({ model: model('deepseek-chat', 'sk-wrong'), prompt: 'x', maxRetries: 0 }),
      sluiceError(401, 'invalid_api_key', 'authentication_error', false),
    );
    await assert.rejects(
      generateText({ model: model('deepseek-reasoner', BETA), prompt: 'x', maxRetries: 0 }),
      sluiceError(403, 'model_not_allowed', 'permission_error', false),
    );
    // Not retried even when retries are allowed.
    const rec = recordingFetch();
    await assert.rejects(
      generateText({ model: model('deepseek-chat', 'sk-wrong', { fetch: rec.fetch }), prompt: 'x', maxRetries: 2 }),
      sluiceError(401, 'invalid_api_key', 'authentication_error', false),
    );
    assert.equal(rec.calls.length, 1);

    const prompt = unique('limited');
    await generateText({ model: model('deepseek-chat', LIMITED_AI), prompt, maxRetries: 0, headers: NO_STORE });
    await assert.rejects(
      generateText({ model: model('deepseek-chat', LIMITED_AI), prompt, maxRetries: 0, headers: NO_STORE }),
      (e) => {
        sluiceError(429, 'rate_limit_exceeded', 'rate_limit_error', true)(e);
        assert.ok(Number(e.responseHeaders['retry-after']) >= 1);
        assert.ok(Number(e.responseHeaders['retry-after-ms']) > 0);
        return true;
      },
    );
  });

  test('429: with retries, generateText waits retry-after-ms and gets through', async (t) => {
    const prompt = unique('limited retry');
    const rec = recordingFetch();
    const m = model('deepseek-chat', LIMITED_AI_RETRY, { fetch: rec.fetch });
    // Spend the burst, then ask again at once.
    await generateText({ model: m, prompt, maxRetries: 0, headers: NO_STORE });
    rec.calls.length = 0;
    const r = await generateText({ model: m, prompt, maxRetries: 2, headers: NO_STORE });
    assert.equal(r.text, ANSWER);
    assertRetriedAsAsked(t, rec);
  });

  test('a stream broken mid-way: await streamText(...).text rejects', async () => {
    const errors = [];
    const r = streamText({
      model: model(),
      prompt: unique('die'),
      maxRetries: 0,
      headers: { 'x-sim-die-after': '3' },
      onError: ({ error }) => errors.push(error),
    });
    // The error event alone would not do it: the AI SDK hands back the text
    // before an error event when the stream then ends cleanly. The abort
    // that follows Sluice's error event is what makes it reject.
    await assert.rejects(r.text, (e) => {
      assert.ok(e instanceof Error, String(e));
      return true;
    });
    assert.ok(
      errors.some((e) => /interrupted/.test(String(e?.message ?? e))),
      `the error event reached onError: ${errors.map(String).join('; ')}`,
    );
  });
});
