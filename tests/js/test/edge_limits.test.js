'use strict';
// Limits at the edge: per-address connection limits answered 429 before any
// upgrade (a flood from one address does not disturb a client on another),
// X-Forwarded-For believed only from trusted proxies, the per-app API rate,
// deadlines for request heads, bodies and trickled frames, the descriptor
// reserve, and 1,000 connections from one address under the defaults.
const { describe, it, after, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const WebSocket = require('ws');
const h = require('../lib/harness');

const nodes = [];
async function start(options) {
  const node = await h.startNode(options);
  nodes.push(node);
  return node;
}
afterEach(() => h.cleanupClients());
after(async () => {
  await h.cleanupClients();
  for (const n of nodes) {
    await n.stop();
    h.saveLog(n, `edge-${n.port}`);
  }
});

/** One WebSocket handshake: resolves { status, retryAfter, ws } (status 101 when it opened). */
function attempt(url, { localAddress, headers } = {}) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { localAddress, headers });
    ws.on('error', (e) => resolve({ status: 0, error: e.message }));
    ws.once('unexpected-response', (req, res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, retryAfter: res.headers['retry-after'], body }));
      res.on('error', () => resolve({ status: res.statusCode, retryAfter: res.headers['retry-after'], body }));
    });
    ws.once('open', () => resolve({ status: 101, ws }));
  });
}

async function metric(node, name, labels) {
  const { text } = await h.getMetrics(node);
  return h.metricValue(text, name, labels) || 0;
}

function percentile(values, p) {
  if (!values.length) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

describe('limits at the edge', () => {
  it('refuses a 10 s connection flood from one address with 429 while a client on another address gets every event', async () => {
    const node = await start({ apps: ['app1'], node: { connections_per_ip_per_minute: 60, max_connections_per_ip: 0 } });
    const url = node.wsUrl(node.app.key);
    const channel = h.uniq('control-');
    const control = new h.RawClient(url, { wsOptions: { localAddress: '127.0.0.2' } });
    await control.established();
    const sub = await control.subscribe(channel);
    assert.equal(sub.event, 'pusher_internal:subscription_succeeded');

    // A steady publisher; each event carries its sequence number and send time.
    const sdk = h.sdk(node);
    let seq = 0;
    let publishing = true;
    let flooding = false;
    const sent = [];
    const publisher = (async () => {
      while (publishing) {
        const n = seq++;
        const at = Date.now();
        const res = await h.sdkResult(sdk.trigger(channel, 'tick', { n, at }));
        assert.equal(res.status, 200, res.text);
        sent.push({ n, at, phase: flooding ? 'during' : 'before' });
        await h.sleep(20);
      }
    })();
    await h.sleep(2000);

    // The flood: 40 handshakes in flight at all times, for 10 s, from 127.0.0.1.
    flooding = true;
    const outcomes = { accepted: 0, refused: 0, other: [] };
    let retryAfterMissing = 0;
    const floodEnd = Date.now() + 10000;
    await Promise.all(Array.from({ length: 40 }, async () => {
      while (Date.now() < floodEnd) {
        const r = await attempt(url);
        if (r.status === 101) { outcomes.accepted++; r.ws.terminate(); }
        else if (r.status === 429) {
          outcomes.refused++;
          if (!(Number(r.retryAfter) >= 1)) retryAfterMissing++;
        } else outcomes.other.push(r.status || r.error);
      }
    }));
    flooding = false;
    await h.sleep(1000);
    publishing = false;
    await publisher;

    // 60 at once from a full bucket, then one a second.
    assert.ok(outcomes.accepted >= 60 && outcomes.accepted <= 60 + 13, `accepted ${outcomes.accepted}`);
    assert.ok(outcomes.refused > 100, `refused ${outcomes.refused}`);
    assert.deepEqual(outcomes.other, [], 'every other attempt was answered 429');
    assert.equal(retryAfterMissing, 0, 'every 429 carried Retry-After');
    assert.ok(await metric(node, 'belfry_connections_refused_total', { reason: 'ip_rate' }) >= outcomes.refused);

    // The control client got every event exactly once, in order.
    await h.eventually(() => control.frames.filter((f) => f.event === 'tick').length >= sent.length,
      { timeout: 5000, message: `all ${sent.length} events at the control client` });
    const got = control.frames.filter((f) => f.event === 'tick');
    assert.deepEqual(got.map((f) => f.data.n), sent.map((s) => s.n));
    const latency = { before: [], during: [] };
    got.forEach((f, i) => latency[sent[i].phase].push(f.at - f.data.at));
    assert.ok(control.isOpen, 'the control client is still connected');
    console.log(`flood: ${outcomes.accepted} accepted, ${outcomes.refused} refused with 429; control client `
      + `p99 ${percentile(latency.before, 99)} ms before (${latency.before.length} events), `
      + `${percentile(latency.during, 99)} ms during (${latency.during.length} events)`);
  });

  it('enforces max_connections_per_ip, and a forged X-Forwarded-For from an untrusted peer changes nothing', async () => {
    const node = await start({ apps: ['app1'], node: { max_connections_per_ip: 5, connections_per_ip_per_minute: 0 } });
    const url = node.wsUrl(node.app.key);
    const held = [];
    for (let i = 0; i < 5; i++) {
      const r = await attempt(url, { headers: { 'x-forwarded-for': `198.51.100.${i + 1}`, forwarded: `for=198.51.100.${i + 1}` } });
      assert.equal(r.status, 101);
      held.push(r.ws);
    }
    const over = await attempt(url, { headers: { 'x-forwarded-for': '203.0.113.77' } });
    assert.equal(over.status, 429);
    assert.equal(over.retryAfter, '5');
    assert.match(JSON.parse(over.body).error, /Too many connections/);
    // Another address is its own count.
    const other = await attempt(url, { localAddress: '127.0.0.3' });
    assert.equal(other.status, 101);
    other.ws.terminate();
    // A slot frees when a connection ends.
    held.pop().close();
    await h.eventually(async () => (await attempt(url).then((r) => { if (r.ws) { held.push(r.ws); } return r.status === 101; })),
      { timeout: 3000, message: 'a connection once one left' });
    assert.ok(await metric(node, 'belfry_connections_refused_total', { reason: 'ip_connections' }) >= 1);
    for (const ws of held) ws.terminate();
  });

  it('behind a trusted proxy, counts the right-most untrusted X-Forwarded-For address', async () => {
    const node = await start({
      apps: ['app1'],
      node: { max_connections_per_ip: 2, connections_per_ip_per_minute: 0, trusted_proxies: ['127.0.0.1/32'] },
    });
    const url = node.wsUrl(node.app.key);
    const held = [];
    // Different clients behind the proxy each get their own limit.
    for (const client of ['198.51.100.1', '198.51.100.2', '198.51.100.3']) {
      for (let i = 0; i < 2; i++) {
        const r = await attempt(url, { headers: { 'x-forwarded-for': client } });
        assert.equal(r.status, 101, `${client} #${i}`);
        held.push(r.ws);
      }
    }
    // A client that prepends a forged address is still counted as itself.
    const forged = await attempt(url, { headers: { 'x-forwarded-for': '6.6.6.6, 198.51.100.1' } });
    assert.equal(forged.status, 429);
    // RFC 7239 Forwarded works when there is no X-Forwarded-For.
    const viaForwarded = await attempt(url, { headers: { forwarded: 'for="[2001:db8::1]:4711"' } });
    assert.equal(viaForwarded.status, 101);
    held.push(viaForwarded.ws);
    // From an untrusted peer (127.0.0.4) the header is ignored: its own address counts.
    const direct = [];
    for (let i = 0; i < 2; i++) {
      const r = await attempt(url, { localAddress: '127.0.0.4', headers: { 'x-forwarded-for': `198.51.100.${50 + i}` } });
      assert.equal(r.status, 101);
      direct.push(r.ws);
    }
    const third = await attempt(url, { localAddress: '127.0.0.4', headers: { 'x-forwarded-for': '198.51.100.99' } });
    assert.equal(third.status, 429);
    for (const ws of [...held, ...direct]) ws.terminate();
  });

  it('answers an API flood with 429, Retry-After and the error body, without touching other apps or counting unsigned requests', async () => {
    const node = await start({ apps: [{ id: 'limited', api_requests_per_second: 20 }, { id: 'free' }] });
    const limited = node.apps.limited;
    const trigger = (app, extra = {}) => h.signedRequest(node, app, {
      method: 'POST', path: `/apps/${app.id}/events`, body: { name: 'e', channel: 'flood', data: '{}' }, ...extra,
    });
    // Badly signed requests do not spend the app's budget.
    const forged = await Promise.all(Array.from({ length: 100 }, () => trigger(limited, { secret: 'wrong' })));
    assert.ok(forged.every((r) => r.status === 401), 'forged requests are refused as unauthorized');
    const started = Date.now();
    const results = await Promise.all(Array.from({ length: 200 }, () => trigger(limited)));
    const elapsed = (Date.now() - started) / 1000;
    const ok = results.filter((r) => r.status === 200).length;
    const limitedOnes = results.filter((r) => r.status === 429);
    assert.equal(ok + limitedOnes.length, 200, `statuses: ${[...new Set(results.map((r) => r.status))]}`);
    assert.ok(ok >= 20, `${ok} accepted: a full second's budget passes at once`);
    assert.ok(ok <= 20 + Math.ceil(elapsed * 20) + 1, `${ok} accepted in ${elapsed} s`);
    assert.ok(limitedOnes.length > 0);
    for (const r of limitedOnes) {
      assert.ok(Number(r.headers.get('retry-after')) >= 1);
      assert.match(r.json.error, /API requests per second/);
    }
    // The SDK sees a 429 too.
    const sdkFlood = await Promise.all(Array.from({ length: 60 }, () => h.sdkResult(h.sdk(node, limited).trigger('c', 'e', {}))));
    assert.ok(sdkFlood.some((r) => r.status === 429));
    // Another app on the node is not limited.
    const free = await Promise.all(Array.from({ length: 100 }, () => trigger(node.apps.free)));
    assert.ok(free.every((r) => r.status === 200));
    assert.ok(await metric(node, 'belfry_rate_limited_total', { app: 'limited', kind: 'api' }) >= limitedOnes.length);
    // The budget comes back.
    await h.sleep(1100);
    assert.equal((await trigger(limited)).status, 200);
  });

  it('drops a slowloris client within the header deadline, and a trickled body gets 408', async () => {
    const node = await start({ apps: ['app1'], node: { header_timeout_secs: 2, body_timeout_secs: 2 } });
    const sock = net.connect(node.port, h.HOST);
    await new Promise((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
    const opened = Date.now();
    sock.write(`GET /app/${node.app.key} HTTP/1.1\r\nHost: x\r\n`);
    const closed = new Promise((resolve) => sock.once('close', () => resolve(Date.now())));
    sock.on('error', () => {});
    let received = '';
    sock.on('data', (d) => { received += d; });
    const trickle = setInterval(() => { if (!sock.destroyed) sock.write('X'); }, 300);
    const closedAt = await h.withTimeout(closed, 8000, 'the slowloris socket is closed');
    clearInterval(trickle);
    const after = (closedAt - opened) / 1000;
    assert.ok(after >= 1.5 && after < 5, `closed after ${after} s`);
    assert.ok(!received.includes('101'), 'never upgraded');

    // A body trickled one byte at a time.
    const body = JSON.stringify({ name: 'e', channel: 'c', data: 'x'.repeat(200) });
    const req = net.connect(node.port, h.HOST);
    await new Promise((resolve) => req.once('connect', resolve));
    req.on('error', () => {});
    let answer = '';
    req.on('data', (d) => { answer += d; });
    const reqClosed = new Promise((resolve) => req.once('close', resolve));
    req.write(`POST /apps/app1/events?auth_key=x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`);
    let i = 0;
    const drip = setInterval(() => { if (!req.destroyed && i < body.length) req.write(body[i++]); }, 200);
    await h.withTimeout(reqClosed, 8000, 'the trickled body is answered and closed');
    clearInterval(drip);
    assert.match(answer, /^HTTP\/1\.1 408/);
    assert.ok(i < body.length, 'answered before the body was complete');

    // A declared body over the limit is refused before it is sent.
    const big = await fetch(node.url('/apps/app1/events'), {
      method: 'POST', headers: { 'content-type': 'application/json', 'content-length': '50000000' },
      body: new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode('{')); } }),
      duplex: 'half',
    }).catch((e) => ({ status: 0, error: e }));
    assert.equal(big.status, 413);
  });

  it('closes a socket whose frame trickles in byte by byte, at the activity timeout', async () => {
    const node = await start({ apps: [{ id: 'app1', activity_timeout: 2, pong_timeout: 1 }] });
    const c = await h.rawClient(node);
    // A masked text frame header announcing 100 bytes, then one byte a second: never complete.
    const sock = c.ws._socket;
    sock.write(Buffer.from([0x81, 0x80 | 100, 1, 2, 3, 4]));
    const opened = Date.now();
    const drip = setInterval(() => { if (!sock.destroyed) sock.write(Buffer.from([0x41])); }, 500);
    const closed = await h.withTimeout(c.closed, 10000, 'the trickling socket is closed');
    clearInterval(drip);
    const after = (Date.now() - opened) / 1000;
    assert.equal(closed.code, 4201);
    assert.ok(after < 6, `closed after ${after} s`);
  });

  it('sheds connections past the descriptor reserve with 503, keeps /metrics up, and admits again when they leave', async () => {
    const node = await start({ apps: ['app1'], fdLimit: 200, node: { fd_reserve: 60 } });
    const url = node.wsUrl(node.app.key);
    const held = [];
    let shed;
    for (let i = 0; i < 200 && !shed; i++) {
      const r = await attempt(url);
      if (r.status === 101) held.push(r.ws);
      else shed = r;
    }
    assert.ok(shed, `no connection was shed after ${held.length}`);
    assert.equal(shed.status, 503, JSON.stringify(shed));
    assert.equal(shed.retryAfter, '5');
    assert.ok(held.length > 50, `${held.length} connections before shedding`);
    // The reserve serves the metrics port.
    assert.ok(await metric(node, 'belfry_connections_refused_total', { reason: 'fd_reserve' }) >= 1);
    const { status } = await fetch(node.metricsUrl('/readyz'));
    assert.equal(status, 200);
    for (const ws of held.splice(0, 10)) ws.close();
    await h.eventually(async () => (await attempt(url).then((r) => { if (r.ws) held.push(r.ws); return r.status === 101; })),
      { timeout: 5000, message: 'admitted again once some left' });
    for (const ws of held) ws.terminate();
  });

  it('lets 1,000 connections from one address in at once under the default limits', async () => {
    const node = await start({ apps: ['app1'], node: { max_connections_per_ip: undefined, connections_per_ip_per_minute: undefined } });
    const url = node.wsUrl(node.app.key);
    const results = await Promise.all(Array.from({ length: 1000 }, () => attempt(url)));
    const statuses = {};
    for (const r of results) statuses[r.status] = (statuses[r.status] || 0) + 1;
    assert.deepEqual(statuses, { 101: 1000 });
    await h.eventually(async () => (await metric(node, 'belfry_connections', { app: 'app1' })) === 1000,
      { timeout: 10000, message: '1,000 connections open' });
    for (const r of results) r.ws.terminate();
  });
});
