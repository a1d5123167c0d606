// The official openai npm SDK (AzureOpenAI) through the gateway: a plain chat
// completion and a streamed one with usage. Started by ../run.sh, which exports
// the gateway's URL, the client key and the instances' URLs.
import { test, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { AzureOpenAI } from 'openai';

const gateway = process.env.AOAI_GATEWAY_URL;
const clientKey = process.env.AOAI_CLIENT_KEY;
const simKey = process.env.AOAI_SIM_KEY;
const sims = (process.env.AOAI_SIM_URLS ?? '').split(',').filter(Boolean);
const apiVersion = process.env.AOAI_API_VERSION ?? '2025-04-01-preview';
const deployment = 'gpt-4o';

if (!gateway || !clientKey || !simKey || sims.length === 0) {
  throw new Error('start this test with sdk-tests/run.sh');
}

// Every request body the SDK sends, so the test can compare it with what the
// instance recorded.
const sent = [];
const recordingFetch = async (url, init) => {
  const body = typeof init?.body === 'string' ? init.body : '';
  sent.push({ url: String(url), method: init?.method ?? 'GET', body });
  return fetch(url, init);
};

function client() {
  return new AzureOpenAI({
    endpoint: gateway,
    apiKey: clientKey,
    apiVersion,
    maxRetries: 0,
    timeout: 20_000,
    fetch: recordingFetch,
  });
}

async function sim(url, method, path) {
  const r = await fetch(url + path, { method, headers: { 'api-key': simKey } });
  assert.ok(r.ok, `${method} ${url}${path}: ${r.status}`);
  return method === 'GET' ? r.json() : null;
}

async function journals() {
  const out = [];
  for (const url of sims) {
    const data = await sim(url, 'GET', '/_sim/journal');
    const entries = Array.isArray(data) ? data : data.entries;
    out.push(entries.filter((e) => !e.path.startsWith('/_sim/')));
  }
  return out;
}

// Exactly one instance received the chat request, with the bytes the SDK sent
// and the backend's key instead of the client's.
// Returns the index of that instance.
async function assertForwardedOnce(body) {
  let entries = [];
  for (let i = 0; i < 50; i++) {
    entries = (await journals()).flatMap((list, idx) =>
      list
        .filter((e) => e.method === 'POST' && e.path === `/openai/deployments/${deployment}/chat/completions`)
        .map((e) => ({ idx, e })),
    );
    if (entries.length && entries.every(({ e }) => e.outcome !== 'in_flight')) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(entries.length, 1, 'exactly one instance received the request');
  const { idx, e } = entries[0];
  assert.equal(e.status, 200);
  assert.equal(e.query, `api-version=${apiVersion}`);
  assert.equal(e.body_sha256, createHash('sha256').update(body).digest('hex'));
  assert.equal(e.deployment, deployment);
  const names = e.headers.map(([k]) => k.toLowerCase());
  assert.equal(names.filter((n) => n === 'api-key' || n === 'authorization').length, 1);
  for (const [k, v] of e.headers) {
    assert.ok(!v.includes(clientKey), `client key leaked in ${k}`);
  }
  return idx;
}

beforeEach(async () => {
  sent.length = 0;
  for (const url of sims) {
    await sim(url, 'DELETE', '/_sim/faults');
    await sim(url, 'DELETE', '/_sim/journal');
  }
});

test('azure chat completion through the gateway reaches one instance', async () => {
  const r = await client().chat.completions.create({
    model: deployment,
    messages: [{ role: 'user', content: 'Say hello' }],
    max_tokens: 20,
  });
  assert.equal(r.object, 'chat.completion');
  assert.ok(r.choices[0].message.content.length > 0);
  assert.equal(sent.length, 1);
  assert.ok(sent[0].url.startsWith(`${gateway}/openai/deployments/${deployment}/chat/completions?`));
  await assertForwardedOnce(sent[0].body);
});

test('azure streamed chat yields every chunk and the usage chunk', async () => {
  const stream = await client().chat.completions.create({
    model: deployment,
    messages: [{ role: 'user', content: 'Count to five' }],
    max_tokens: 30,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.ok(chunks.length >= 3, `got ${chunks.length} chunks`);
  const text = chunks.map((c) => c.choices?.[0]?.delta?.content ?? '').join('');
  assert.ok(text.trim().length > 0);
  const withUsage = chunks.filter((c) => c.usage);
  assert.equal(withUsage.length, 1);
  const last = chunks[chunks.length - 1];
  assert.equal(last, withUsage[0], 'the usage chunk comes last');
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.total_tokens, last.usage.prompt_tokens + last.usage.completion_tokens);
  const idx = await assertForwardedOnce(sent[0].body);

  // The same request straight to that instance yields as many events: the
  // SDK's iterator, through the gateway, handed over every one.
  const direct = await fetch(
    `${sims[idx]}/openai/deployments/${deployment}/chat/completions?api-version=${apiVersion}`,
    { method: 'POST', headers: { 'api-key': simKey, 'content-type': 'application/json' }, body: sent[0].body },
  );
  assert.equal(direct.status, 200);
  const events = (await direct.text())
    .split('\n')
    .filter((l) => l.startsWith('data:') && l.slice(5).trim() !== '[DONE]');
  assert.equal(chunks.length, events.length);
});
