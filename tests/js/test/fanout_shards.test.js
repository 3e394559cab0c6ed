'use strict';
// A node with 4 fan-out shards: one channel's subscribers are spread over every shard, and each of
// them gets every event exactly once and in the same order, including while many publish requests
// are in flight and while subscribers come and go. The per-shard counters show the work was shared.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const SHARDS = 4;
const ctx = h.useNode({ apps: [{ id: 'app1' }], node: { fanout_shards: SHARDS } }, 'fanout_shards');

/** The `n` of every `Shard` event a client got on `channel`, in arrival order. */
function sequence(client, channel) {
  const out = [];
  for (const f of client.frames) {
    if (f.event !== 'Shard' || f.channel !== channel) continue;
    out.push((typeof f.data === 'string' ? JSON.parse(f.data) : f.data).n);
  }
  return out;
}

/** Publishes `requests` batches of 10 events, `inFlight` requests at a time; returns the acked ns. */
async function publish(node, channel, requests, inFlight, from = 0) {
  const sdk = h.sdk(node);
  const acked = [];
  let next = 0;
  async function lane() {
    while (next < requests) {
      const r = next++;
      const batch = Array.from({ length: 10 }, (_, i) => ({ channel, name: 'Shard', data: { n: from + r * 10 + i } }));
      const ns = batch.map((b) => b.data.n);
      const res = await h.sdkResult(sdk.triggerBatch(batch));
      assert.equal(res.status, 200, res.text);
      acked.push(...ns);
    }
  }
  await Promise.all(Array.from({ length: inFlight }, lane));
  return acked;
}

async function shardDeliveries(node) {
  const { text } = await h.getMetrics(node);
  return Array.from({ length: SHARDS }, (_, i) => h.metricValue(text, 'belfry_fanout_deliveries_total', { shard: String(i) }) || 0);
}

describe(`fan-out over ${SHARDS} shards`, () => {
  it('every subscriber gets every event once, in publish order, and every shard delivers', async () => {
    const { node } = ctx;
    const channel = h.uniq('shards-');
    const before = await shardDeliveries(node);
    const clients = [];
    for (let i = 0; i < 24; i++) clients.push(await h.rawClient(node));
    await Promise.all(clients.map((c) => c.subscribe(channel)));

    // One publisher, one request at a time: the order is the publish order.
    const acked = await publish(node, channel, 50, 1);
    await h.eventually(() => clients.every((c) => sequence(c, channel).length >= acked.length), {
      timeout: 15000,
      message: `all ${acked.length} events on every subscriber (have ${clients.map((c) => sequence(c, channel).length).join('/')})`,
    }).catch(() => {});
    await h.sleep(300);
    for (const [i, c] of clients.entries()) {
      assert.deepEqual(sequence(c, channel), acked, `subscriber ${i} got every event once, in order`);
    }
    const after = await shardDeliveries(node);
    const delta = after.map((v, i) => v - before[i]);
    assert.equal(delta.reduce((a, b) => a + b, 0), clients.length * acked.length, `deliveries per shard ${delta}`);
    assert.ok(delta.filter((d) => d > 0).length >= 2, `at least two shards delivered: ${delta}`);
  });

  it('20 requests in flight: all subscribers see the same order, nothing lost or doubled', async () => {
    const { node } = ctx;
    const channel = h.uniq('shards-burst-');
    const clients = [];
    for (let i = 0; i < 16; i++) clients.push(await h.rawClient(node));
    await Promise.all(clients.map((c) => c.subscribe(channel)));
    const acked = await publish(node, channel, 200, 20);
    await h.eventually(() => clients.every((c) => sequence(c, channel).length >= acked.length), {
      timeout: 15000,
      message: 'every acknowledged event on every subscriber',
    }).catch(() => {});
    await h.sleep(300);
    const reference = sequence(clients[0], channel);
    assert.deepEqual([...reference].sort((a, b) => a - b), [...acked].sort((a, b) => a - b), 'subscriber 0 got each acked event once');
    for (const [i, c] of clients.entries()) {
      assert.deepEqual(sequence(c, channel), reference, `subscriber ${i} saw the same order as subscriber 0`);
    }
  });

  it('subscribers joining and leaving on every shard during a burst: those who stay get everything', async () => {
    const { node } = ctx;
    const channel = h.uniq('shards-churn-');
    const stayers = [];
    for (let i = 0; i < 8; i++) stayers.push(await h.rawClient(node));
    await Promise.all(stayers.map((c) => c.subscribe(channel)));
    let churning = true;
    const churn = (async () => {
      while (churning) {
        const c = await h.rawClient(node);
        await c.subscribe(channel);
        await h.sleep(Math.random() * 20);
        c.send({ event: 'pusher:unsubscribe', data: { channel } });
        c.close();
      }
    })();
    const acked = await publish(node, channel, 150, 10);
    churning = false;
    await churn;
    await h.eventually(() => stayers.every((c) => sequence(c, channel).length >= acked.length), {
      timeout: 15000,
      message: 'every acknowledged event on every subscriber that stayed',
    }).catch(() => {});
    await h.sleep(300);
    const reference = sequence(stayers[0], channel);
    assert.equal(new Set(reference).size, acked.length, 'subscriber 0 got each acked event once');
    for (const [i, c] of stayers.entries()) {
      assert.deepEqual(sequence(c, channel), reference, `subscriber ${i} saw the same events in the same order`);
    }
  });
});
