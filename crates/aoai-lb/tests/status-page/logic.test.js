// Unit tests of the status page's pure functions. They run the page's own
// inline script (extracted from the embedded HTML file, so there is one
// source of truth) in a sandbox without a DOM.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');

const PAGE = path.join(__dirname, '..', '..', 'src', 'status.html');

function load() {
  const html = fs.readFileSync(PAGE, 'utf8');
  const start = html.indexOf('<script>') + '<script>'.length;
  const end = html.indexOf('</script>', start);
  const sandbox = { module: { exports: {} } };
  vm.runInNewContext(html.slice(start, end), sandbox, { filename: 'status.html' });
  return sandbox.module.exports;
}

const page = load();

test('formats a countdown in tenths under ten seconds and coarser above', () => {
  assert.equal(page.formatDuration(0), '0 s');
  assert.equal(page.formatDuration(-5), '0 s');
  assert.equal(page.formatDuration(NaN), '0 s');
  assert.equal(page.formatDuration(1), '0.1 s');
  assert.equal(page.formatDuration(4321), '4.4 s');
  assert.equal(page.formatDuration(9999), '10.0 s');
  assert.equal(page.formatDuration(10000), '10 s');
  assert.equal(page.formatDuration(59000), '59 s');
  assert.equal(page.formatDuration(59001), '1 min 00 s');
  assert.equal(page.formatDuration(60000), '1 min 00 s');
  assert.equal(page.formatDuration(185000), '3 min 05 s');
  assert.equal(page.formatDuration(3600000), '1 h 00 min');
  assert.equal(page.formatDuration(7620000), '2 h 07 min');
});

test('counts a cooldown down from when it was fetched and stops at zero', () => {
  assert.equal(page.remaining(30000, 1000, 1000), 30000);
  assert.equal(page.remaining(30000, 1000, 3500), 27500);
  assert.equal(page.remaining(30000, 1000, 40000), 0);
  // A clock that seems to run backwards never adds time.
  assert.equal(page.remaining(30000, 1000, 500), 30000);
});

test('a strip cell shows failures over throttling over success', () => {
  assert.equal(page.cellState([5, 1, 1], false, false), 'failing');
  assert.equal(page.cellState([5, 1, 0], false, false), 'throttled');
  assert.equal(page.cellState([5, 0, 0], false, false), 'ok');
  assert.equal(page.cellState([0, 0, 0], false, false), 'idle');
  assert.equal(page.cellState([0, 0, 0], true, false), 'throttled', 'skipped while cooling');
  assert.equal(page.cellState([3, 0, 0], true, true), 'failing', 'breaker open');
});

test('buckets the strip newest last and marks cooling periods without traffic', () => {
  const history = [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [2, 0, 0]];
  // 5 s buckets, the newest 1 s old; a cooldown from 12 s ago to 7 s ago.
  const cells = page.strip(history, 5000, 1000, [
    { kind: 'cooling', from_ago_ms: 12000, until_ago_ms: 7000 },
  ]);
  assert.deepEqual(Array.from(cells, (c) => c.state), ['ok', 'throttled', 'throttled', 'idle', 'ok']);
  // A cooldown still going on colours the current bucket too.
  const now = page.strip(history, 5000, 1000, [
    { kind: 'cooling', from_ago_ms: 500, until_ago_ms: -3000 },
  ]);
  assert.deepEqual(Array.from(now, (c) => c.state), ['ok', 'idle', 'throttled', 'idle', 'throttled']);
  assert.deepEqual(Array.from(cells, (c) => [c.fromAgoMs, c.toAgoMs]), [
    [21000, 16000], [16000, 11000], [11000, 6000], [6000, 1000], [1000, 0],
  ]);
  // Coverage is exact: [16 s, 11 s) overlaps a period starting 12 s ago.
  const cooledFrom12 = page.strip([[0, 0, 0], [0, 0, 0]], 5000, 1000, [
    { kind: 'breaker_open', from_ago_ms: 12000, until_ago_ms: 11500 },
  ]);
  assert.deepEqual(Array.from(cooledFrom12, (c) => c.state), ['idle', 'idle']);
  const broken = page.strip([[0, 0, 0], [0, 0, 0]], 5000, 1000, [
    { kind: 'breaker_open', from_ago_ms: 3000, until_ago_ms: 2000 },
  ]);
  assert.deepEqual(Array.from(broken, (c) => c.state), ['failing', 'idle']);
});

test('attempts per minute cover about the last minute', () => {
  const history = Array.from({ length: 60 }, () => [0, 0, 0]);
  assert.equal(page.perMinute(history, 5000, 0), 0);
  // 60 attempts in the last 13 buckets (60 s + the current one, 0 s into it).
  for (let i = 47; i < 60; i++) history[i] = [5, 0, 0];
  history[59] = [0, 0, 0];
  assert.equal(Math.round(page.perMinute(history, 5000, 0)), 60);
  // Older attempts do not count.
  history[0] = [1000, 0, 0];
  assert.equal(Math.round(page.perMinute(history, 5000, 0)), 60);
  assert.equal(page.perMinute([], 5000, 0), 0);
});

test('describes a 429 by its status and the header its cooldown came from', () => {
  const t = {
    status: 429,
    headers: [['retry-after-ms', '30000'], ['retry-after', '30'], ['x-ratelimit-remaining-requests', '0'],
      ['x-ratelimit-remaining-tokens', '1200']],
  };
  assert.equal(page.describeThrottle(t), '429 · retry-after-ms 30000');
  assert.equal(page.quotaLeft(t), 'remaining requests 0 · tokens 1200');
  const reset = { status: 429, headers: [['x-ratelimit-reset-tokens', '6m0s']] };
  assert.equal(page.describeThrottle(reset), '429 · x-ratelimit-reset-tokens 6m0s');
  assert.equal(page.quotaLeft(reset), '');
  assert.equal(page.describeThrottle({ status: 429, headers: [] }), '429 · no retry header, default cooldown');
  assert.equal(page.describeThrottle(null), '');
});

test('labels states and shows unknown ones as they are', () => {
  assert.equal(page.stateLabel('breaker_open'), 'breaker open');
  assert.equal(page.stateLabel('half_open'), 'probing');
  assert.equal(page.stateLabel('<b>x</b>'), '<b>x</b>');
  assert.equal(page.stateLabel('constructor'), 'constructor');
});

test('formats rates for the tables', () => {
  assert.equal(page.formatRate(undefined), '–');
  assert.equal(page.formatRate(0), '0');
  assert.equal(page.formatRate(2.345), '2.3');
  assert.equal(page.formatRate(1234.5), '1235');
});
