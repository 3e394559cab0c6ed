'use strict';
// Pusher's subscription counting with pusher-js: `pusher:subscription_count` on channels of an
// app with subscription_count_events, the latest count at most once a second per channel (a
// burst of joins is coalesced), cluster-wide over two nodes, never on presence channels, and
// nothing for apps without the setting; the subscription_count webhook from one node per channel.
const { describe, it, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const { startReceiver } = require('../lib/webhook_receiver');

const COUNTED = { id: 'app1', key: 'app1-key', secret: 'app1-secret', subscription_count_events: true };

let node;
let cluster;
let receiver;
afterEach(async () => {
  await h.cleanupClients();
  if (node) { await node.stop(); node = null; }
  if (cluster) { await cluster.stop(); cluster.saveLogs('subscription-count'); cluster = null; }
  if (receiver) { await receiver.close(); receiver = null; }
});

/** The subscription_count webhooks for `channel`, deduplicated by webhook id, as their counts. */
function hookCounts(channel) {
  return receiver.delivered()
    .filter((e) => e.channel === channel && e.name === 'subscription_count')
    .map((e) => e.subscription_count);
}

/** The counted app with a webhook URL that wants subscription_count. */
async function countedWithHook() {
  receiver = await startReceiver(COUNTED, {});
  return { ...COUNTED, webhooks: [{ url: receiver.url, event_types: ['subscription_count'] }] };
}

/** A pusher-js client subscribed to `name`, recording every subscription count it is told. */
async function counter(n, name) {
  const client = h.pusherClient(n);
  await h.connected(client);
  const channel = await h.subscribed(client, name);
  const counts = [];
  channel.bind('pusher:subscription_count', (data) => counts.push(data.subscription_count));
  return { client, channel, counts };
}

describe('subscription counts', () => {
  it('a burst of 30 joins: each subscriber is told the final count, a few frames at most, not one per join', async () => {
    node = await h.startNode({ apps: [await countedWithHook()] });
    const name = h.uniq('counted-');
    const clients = await Promise.all(Array.from({ length: 30 }, () => counter(node, name)));
    await h.eventually(() => clients.every((c) => c.counts.at(-1) === 30), { timeout: 5000, message: 'everyone told 30' });
    const start = Date.now();
    await h.sleep(1500);
    for (const c of clients) {
      assert.equal(c.counts.at(-1), 30);
      assert.ok(c.counts.length <= 4, `coalesced: ${JSON.stringify(c.counts)}`);
    }
    // Ten leave: the rest are told 20.
    for (const c of clients.slice(0, 10)) c.client.unsubscribe(name);
    await h.eventually(() => clients.slice(10).every((c) => c.counts.at(-1) === 20), { timeout: 5000, message: 'told 20' });
    assert.ok(Date.now() - start < 10000);
    // The webhook is coalesced the same way: a few counts, ending at 20, each one a change.
    await h.eventually(() => hookCounts(name).at(-1) === 20, { timeout: 5000, message: 'webhook with 20' });
    const counts = hookCounts(name);
    assert.ok(counts.length <= 6, `coalesced webhooks: ${JSON.stringify(counts)}`);
    assert.ok(counts.includes(30), `the count of 30 was reported: ${JSON.stringify(counts)}`);
    for (let i = 1; i < counts.length; i++) assert.notEqual(counts[i], counts[i - 1], `only changes: ${JSON.stringify(counts)}`);
    assert.ok(receiver.requests.every((r) => r.valid), 'the pusher SDK accepts every request');
  });

  it('presence channels get no count, and an app without the setting gets none', async () => {
    node = await h.startNode({ apps: [COUNTED, { id: 'plain', key: 'plain-key', secret: 'plain-secret' }] });
    const pres = h.uniq('presence-nocount-');
    const a = h.pusherClient(node);
    await h.connected(a);
    const p = await h.subscribed(a, pres);
    const presenceCounts = [];
    p.bind('pusher:subscription_count', (d) => presenceCounts.push(d));
    const plainApp = node.apps.plain;
    const b = h.pusherClient(node, plainApp);
    await h.connected(b);
    const plain = await h.subscribed(b, h.uniq('plain-'));
    const plainCounts = [];
    plain.bind('pusher:subscription_count', (d) => plainCounts.push(d));
    // A counted channel on the same node shows the ticker is running.
    const c = await counter(node, h.uniq('counted-'));
    await h.eventually(() => c.counts.length > 0, { timeout: 5000, message: 'the counted channel got its count' });
    await h.sleep(1200);
    assert.deepEqual(presenceCounts, []);
    assert.deepEqual(plainCounts, []);
  });

  it('cluster: subscribers on two nodes are told the cluster-wide count', async () => {
    const app = await countedWithHook();
    cluster = await h.startCluster({ nodes: 2, coordinator: false, apps: [app] });
    await cluster.addCoordinator({ args: ['--config', cluster.nodes[0].configFile] });
    const [A, B] = cluster.nodes;
    const name = h.uniq('counted-');
    const onA = await Promise.all(Array.from({ length: 3 }, () => counter(A, name)));
    const onB = await Promise.all(Array.from({ length: 2 }, () => counter(B, name)));
    await h.eventually(() => [...onA, ...onB].every((c) => c.counts.at(-1) === 5), { timeout: 6000, message: 'everyone told 5' });
    onB[0].client.unsubscribe(name);
    await h.eventually(() => [...onA, onB[1]].every((c) => c.counts.at(-1) === 4), { timeout: 6000, message: 'everyone told 4' });
    // One node reports each count: no value twice in a row, though both nodes hold subscribers.
    await h.eventually(() => hookCounts(name).at(-1) === 4, { timeout: 8000, message: 'webhook with 4' });
    await h.sleep(1500);
    const counts = hookCounts(name);
    assert.ok(counts.includes(5), `5 reported: ${JSON.stringify(counts)}`);
    assert.equal(counts.at(-1), 4);
    for (let i = 1; i < counts.length; i++) assert.notEqual(counts[i], counts[i - 1], `one reporter: ${JSON.stringify(counts)}`);
  });
});
