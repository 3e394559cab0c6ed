'use strict';
// Bursts of batch_events with many requests in flight, over a real redis-server: every event the
// HTTP API acknowledged with 200 reaches every subscriber exactly once, on the publishing node and on
// the other one. (fred's subscriber dropped 19-29% of such bursts; the bus now reads Redis itself.)
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 2, apps: [{ id: 'app1' }] }, 'cluster-burst');

/** Sends `requests` batches of 10 events to `channel` through `node`, `inFlight` at a time. */
async function burst(node, channel, requests, inFlight) {
  const sdk = h.sdk(node);
  const acked = [];
  const refused = [];
  let next = 0;
  async function lane() {
    while (next < requests) {
      const r = next++;
      const batch = Array.from({ length: 10 }, (_, i) => ({ channel, name: 'Burst', data: { n: r * 10 + i } }));
      const ns = batch.map((b) => b.data.n); // the SDK encodes `data` in place
      const res = await h.sdkResult(sdk.triggerBatch(batch));
      if (res.status === 200) acked.push(...ns);
      else refused.push(`status ${res.status}: ${res.text}`);
    }
  }
  await Promise.all(Array.from({ length: inFlight }, lane));
  return { acked, refused };
}

function counts(client, channel) {
  const seen = new Map();
  for (const f of client.frames) {
    if (f.event !== 'Burst' || f.channel !== channel) continue;
    const n = (typeof f.data === 'string' ? JSON.parse(f.data) : f.data).n;
    seen.set(n, (seen.get(n) || 0) + 1);
  }
  return seen;
}

async function expectAll(clients, channel, acked) {
  await h.eventually(() => clients.every((c) => counts(c, channel).size >= acked.length), {
    timeout: 15000,
    message: `every acknowledged event on every subscriber (have ${clients.map((c) => counts(c, channel).size).join('/')} of ${acked.length})`,
  }).catch(() => {});
  await h.sleep(300); // duplicates, if any, arrive by now
  for (const [i, c] of clients.entries()) {
    const seen = counts(c, channel);
    const missing = acked.filter((n) => !seen.has(n));
    const doubled = [...seen].filter(([, k]) => k > 1).map(([n]) => n);
    assert.equal(missing.length, 0, `subscriber ${i} missed ${missing.length} of ${acked.length} acknowledged events`);
    assert.equal(doubled.length, 0, `subscriber ${i} got ${doubled.length} events twice`);
  }
}

describe('cluster: bursts lose nothing', () => {
  for (const [requests, inFlight] of [[200, 20], [300, 50]]) {
    it(`${requests} x 10 events, ${inFlight} requests in flight, through node A: subscribers on A and B get each once`, async () => {
      const [A, B] = ctx.cluster.nodes;
      const channel = h.uniq('burst-');
      const onA = await h.rawClient(A);
      const onB = await h.rawClient(B);
      const onB2 = await h.rawClient(B);
      await Promise.all([onA, onB, onB2].map((c) => c.subscribe(channel)));
      const { acked, refused } = await burst(A, channel, requests, inFlight);
      assert.deepEqual(refused, [], 'every batch is acknowledged while Redis is healthy');
      assert.equal(acked.length, requests * 10);
      await expectAll([onA, onB, onB2], channel, acked);
    });
  }

  it('one node over Redis, subscriber on the publishing node: 200 x 10 events, 20 in flight', async () => {
    const [, B] = ctx.cluster.nodes;
    const channel = h.uniq('burst1-');
    const onB = await h.rawClient(B);
    await onB.subscribe(channel);
    const { acked } = await burst(B, channel, 200, 20);
    assert.equal(acked.length, 2000);
    await expectAll([onB], channel, acked);
  });

  it('3,000 envelopes straight into Redis (Publisher batches of 10, 20 in flight): subscribers on A and B get each once', async () => {
    const [A, B] = ctx.cluster.nodes;
    const channel = h.uniq('burst-env-');
    const onA = await h.rawClient(A);
    const onB = await h.rawClient(B);
    await Promise.all([onA, onB].map((c) => c.subscribe(channel)));
    const lines = Array.from({ length: 3000 }, (_, n) => JSON.stringify({ channel, event: 'Burst', data: { n } })).join('\n');
    const bin = process.env.BELFRY_COORDINATOR_BIN || require('node:path').resolve(__dirname, '../../../../target/release/belfry-coordinator');
    const child = spawn(bin, ['publish', '--stdin', '--redis-url', ctx.cluster.redisUrl,
      '--redis-prefix', ctx.cluster.prefix, '--app', 'app1', '--batch', '10', '--in-flight', '20'],
    { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    child.stdin.end(lines);
    const code = await new Promise((resolve) => child.once('exit', resolve));
    assert.equal(code, 0, `belfry-coordinator publish --stdin: ${out}`);
    assert.match(out, /published 3000 of 3000 events; 0 not sent, 0 outcome unknown/);
    await expectAll([onA, onB], channel, Array.from({ length: 3000 }, (_, n) => n));
  });
});
