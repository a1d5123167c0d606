// The status page in a real headless Chromium: the gateway in front of
// three simulated instances is driven into a cooldown (a 429 with
// retry-after-ms) and a breaker opening (500s), and the page must show both,
// with a countdown that runs, under its Content-Security-Policy with no
// violation, and without a key anywhere. It saves a screenshot.
//
// Started by run.sh, which builds the binaries and passes their paths:
//   AOAI_LB_BIN, AOAI_SIM_BIN   the binaries to run
//   CHROMIUM                    the browser (default /usr/bin/chromium)
//   SCREENSHOT                  where to save the picture
// Everything listens on 127.0.0.1; every wait is bounded.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const LB_BIN = process.env.AOAI_LB_BIN;
const SIM_BIN = process.env.AOAI_SIM_BIN;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = process.env.SCREENSHOT || path.join(__dirname, 'out', 'status-page.png');

const SIM_KEY = 'sim-key-never-shown-4b7e';
const CLIENT_KEY = 'client-key-never-shown-91ac';
const procs = [];

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function start(bin, args, env) {
  const p = spawn(bin, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  p.output = '';
  p.stdout.on('data', (d) => { p.output += d; });
  p.stderr.on('data', (d) => { p.output += d; });
  procs.push(p);
  return p;
}

async function waitFor(what, fn, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      if (await fn()) return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}${last ? ': ' + last.message : ''}`);
}

async function chat(base) {
  const resp = await fetch(`${base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, {
    method: 'POST',
    headers: { 'api-key': CLIENT_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ role: 'user', content: 'Say hello' }], max_tokens: 8 }),
    signal: AbortSignal.timeout(10000),
  });
  await resp.arrayBuffer();
  return resp.status;
}

async function fault(simUrl, body) {
  const resp = await fetch(`${simUrl}/_sim/faults`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  assert.ok(resp.ok, await resp.text());
}

test.after(() => {
  for (const p of procs) p.kill('SIGKILL');
});

test('the status page shows a cooldown with its countdown and reason, and a breaker opening',
  { skip: !LB_BIN || !SIM_BIN ? 'run through run.sh (AOAI_LB_BIN, AOAI_SIM_BIN)' : false, timeout: 90000 },
  async () => {
    const { chromium } = require('playwright-core');
    const names = ['ptu-eastus', 'paygo-swedencentral', 'paygo-westus'];
    const sims = [];
    for (const name of names) {
      const port = await freePort();
      start(SIM_BIN, ['--instances', '1', '--base-port', String(port), '--api-key', SIM_KEY, '--admin',
        '--region', name.split('-')[1]]);
      sims.push(`http://127.0.0.1:${port}`);
    }
    for (const url of sims) await waitFor(`sim ${url}`, async () => (await fetch(`${url}/_sim/journal`)).ok);

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aoai-lb-status-'));
    const configFile = path.join(dir, 'instances.json');
    fs.writeFileSync(configFile, JSON.stringify({
      instances: [
        { name: names[0], url: sims[0], api_key: SIM_KEY, priority: 1 },
        { name: names[1], url: sims[1], api_key: SIM_KEY, priority: 2, weight: 2 },
        { name: names[2], url: sims[2], api_key: SIM_KEY, priority: 2 },
      ],
      circuit_breaker: { failure_threshold: 2, open_ms: 60000, max_open_ms: 60000 },
    }, null, 2));
    const [port, adminPort] = [await freePort(), await freePort()];
    const lb = start(LB_BIN, ['--config', configFile, '--host', '127.0.0.1', '--port', String(port),
      '--admin-port', String(adminPort)], { API_KEY: CLIENT_KEY, LOG_FORMAT: 'json', CONFIG_POLL_MS: '100' });
    const base = `http://127.0.0.1:${port}`;
    const admin = `http://127.0.0.1:${adminPort}`;
    await waitFor('the gateway', async () => (await fetch(`${base}/readyz`)).ok);

    // Some good traffic first, then the priority-1 instance answers 429 with
    // retry-after-ms 45 s and the third instance answers 500 until its
    // breaker opens; the second serves everything after that.
    for (let i = 0; i < 6; i++) assert.equal(await chat(base), 200);
    await fault(sims[0], { kind: 'fail', count: null, status: 429, retry_after_ms: 45000 });
    await fault(sims[2], { kind: 'fail', count: null, status: 500 });
    for (let i = 0; i < 24; i++) assert.equal(await chat(base), 200, lb.output);
    const status = await (await fetch(`${admin}/admin/status`)).json();
    const byName = Object.fromEntries(status.instances.map((i) => [i.name, i]));
    assert.equal(byName[names[0]].state, 'cooling', JSON.stringify(status));
    assert.equal(byName[names[2]].state, 'breaker_open', JSON.stringify(status));

    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1500, height: 560 } });
      const problems = [];
      page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') problems.push(m.text()); });
      page.on('pageerror', (e) => problems.push(String(e)));
      const resp = await page.goto(`${admin}/`);
      assert.equal(resp.status(), 200);
      const csp = resp.headers()['content-security-policy'];
      assert.match(csp, /^default-src 'none'; script-src 'sha256-[A-Za-z0-9+/=]+';/);

      const cooling = page.locator(`tr[data-instance="${names[0]}"][data-state="cooling"]`);
      await cooling.waitFor({ timeout: 10000 });
      const countdown = cooling.locator('[data-role="countdown"]');
      const first = await countdown.textContent();
      assert.match(first, /^\d+ s$/);
      const reason = await cooling.locator('[data-role="reason-text"]').textContent();
      assert.equal(reason, '429 · retry-after-ms 45000');
      const detail = await cooling.locator('[data-role="reason"]').textContent();
      assert.match(detail, /remaining requests 0 · tokens 0 · .* ago, cooldown 45 s$/);
      // The countdown runs between polls.
      await page.waitForTimeout(1300);
      const second = await countdown.textContent();
      assert.ok(parseInt(second, 10) < parseInt(first, 10), `${first} then ${second}`);

      await page.locator(`tr[data-instance="${names[2]}"][data-state="breaker_open"]`).waitFor({ timeout: 5000 });
      await page.locator(`tr[data-instance="${names[1]}"][data-state="ok"]`).waitFor({ timeout: 5000 });
      // The strip shows the throttling and the failures.
      assert.ok(await page.locator(`tr[data-instance="${names[0]}"] .strip span[data-state="throttled"]`).count() >= 1);
      assert.ok(await page.locator(`tr[data-instance="${names[2]}"] .strip span[data-state="failing"]`).count() >= 1);
      assert.ok(await page.locator(`tr[data-instance="${names[1]}"] .strip span[data-state="ok"]`).count() >= 1);
      assert.equal(await page.locator('#live').textContent(), 'live');
      // Per-deployment rates: every request above was for gpt-4o.
      const dep = page.locator('#deployments-section tr[data-name="gpt-4o"]');
      await dep.waitFor({ timeout: 5000 });
      const cells = await dep.locator('td').allTextContents();
      assert.equal(cells[1], '30');
      assert.ok(parseInt(cells[2], 10) > 0, `tokens/min ${cells[2]}`);

      const html = await page.content();
      for (const secret of [SIM_KEY, CLIENT_KEY, ...sims]) assert.ok(!html.includes(secret), `${secret} shown`);
      assert.deepEqual(problems, [], 'no CSP violation or script error');

      fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
      await page.screenshot({ path: SCREENSHOT, fullPage: true });

      // Reloads show in the header line: a refused document, then a good one.
      const good = fs.readFileSync(configFile, 'utf8');
      fs.writeFileSync(configFile + '.tmp', good.slice(0, -3));
      fs.renameSync(configFile + '.tmp', configFile);
      const line = page.locator('#reload-line.rejected');
      await line.waitFor({ timeout: 10000 });
      assert.match(await line.textContent(), /^last reload: rejected \(poll\) at .* is not valid JSON: .* at line \d+ column \d+/);
      const next = JSON.parse(good);
      next.instances.pop();
      fs.writeFileSync(configFile + '.tmp', JSON.stringify(next));
      fs.renameSync(configFile + '.tmp', configFile);
      await page.locator('#config-line', { hasText: 'generation 2' }).waitFor({ timeout: 10000 });
      assert.match(await page.locator('#reload-line').textContent(), /^last reload: applied \(poll\)/);
      await page.locator(`tr[data-instance="${names[2]}"]`).waitFor({ state: 'detached', timeout: 5000 });
      assert.deepEqual(problems, [], 'no script error after the reloads');
    } finally {
      await browser.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
