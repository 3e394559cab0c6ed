'use strict';
// The core cluster scenarios on a 3-master local Redis Cluster (sharded pub/sub):
// cross-node delivery, presence across nodes, cluster-wide counts.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 3, redisCluster: 3, apps: [{ id: 'app1' }] }, 'cluster-redis-cluster');

const range = (n) => Array.from({ length: n }, (_, i) => i);

describe('cluster: on a 3-master Redis Cluster', () => {
  it('the URL names three masters', () => {
    assert.match(ctx.cluster.redisUrl, /^redis-cluster:\/\/127\.0\.0\.1:\d+\?node=127\.0\.0\.1:\d+&node=127\.0\.0\.1:\d+$/);
  });

  it('events on channels in different slots reach subscribers on the other nodes once, in order', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    // several channels, so that their hash slots land on different masters
    const names = range(6).map((i) => h.uniq(`rc${i}-`));
    const subs = [];
    for (const name of names) {
      const onA = h.pusherClient(A);
      const onC = h.pusherClient(C);
      const [ca, cc] = await Promise.all([h.subscribed(onA, name), h.subscribed(onC, name)]);
      subs.push({ name, got: [h.collect(ca, 'N'), h.collect(cc, 'N')] });
    }
    const sdkB = h.sdk(B);
    for (const n of range(20)) {
      for (const s of subs) {
        const res = await h.sdkResult(sdkB.trigger(s.name, 'N', { n }));
        assert.equal(res.status, 200, res.text);
      }
    }
    await h.eventually(() => subs.every((s) => s.got.every((g) => g.items.length >= 20)), { timeout: 5000, message: 'every subscriber got 20 events' });
    await h.sleep(300);
    for (const s of subs) {
      for (const g of s.got) assert.deepEqual(g.items.map((x) => x.data.n), range(20), `${s.name}: order / duplicates`);
    }
    // the channels really are spread over the masters
    const slots = await Promise.all(names.map((n) => h.redisCommand(ctx.cluster.redis.ports[0], 'CLUSTER', 'KEYSLOT', `belfry:app1:{${n}}`)));
    const owners = new Set(slots.map((s) => (s < 5461 ? 0 : s < 10923 ? 1 : 2)));
    assert.ok(owners.size >= 2, `channels' slots ${slots} all on one master; pick other names`);
  });

  it('socket_id exclusion and client events across nodes', async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.app;
    const name = h.uniq('private-rcx-');
    const a = await h.rawClient(A);
    const b = await h.rawClient(B);
    for (const c of [a, b]) {
      const s = await c.subscribe(name, h.rawAuth(app, c.socketId, name));
      assert.equal(s.event, 'pusher_internal:subscription_succeeded', s.raw);
    }
    await h.sdk(B).trigger(name, 'Ex', { x: 1 }, { socket_id: a.socketId });
    assert.deepEqual((await b.next('Ex')).data, { x: 1 });
    await a.expectNone('Ex', 300);
    a.send({ event: 'client-hi', channel: name, data: { hi: 1 } });
    assert.deepEqual((await b.next('client-hi')).data, { hi: 1 });
  });

  it('presence across nodes: one member per user, member events once, counts on every node', async () => {
    const nodes = ctx.cluster.nodes;
    const [A, B, C] = nodes;
    const roomName = h.uniq('rcroom');
    const room = `presence-${roomName}`;
    const ann = await h.echoClient(A, A.app, { user: { user_id: 1, user_info: { id: 1, name: 'Ann' } } });
    const joining = [];
    const leaving = [];
    await h.withTimeout(new Promise((r) => ann.join(roomName).here(r).joining((u) => joining.push(u)).leaving((u) => leaving.push(u))), 5000, 'Ann here()');
    const bobUser = { user: { user_id: 2, user_info: { id: 2, name: 'Bob' } } };
    const bob1 = await h.echoClient(B, B.app, bobUser);
    const here = await h.withTimeout(new Promise((r) => bob1.join(roomName).here(r)), 5000, 'Bob here() on B');
    assert.deepEqual(here.map((u) => u.id).sort(), [1, 2]);
    const bob2 = await h.echoClient(C, C.app, bobUser);
    await h.withTimeout(new Promise((r) => bob2.join(roomName).here(r)), 5000, 'Bob tab 2 on C');
    await h.eventually(() => joining.length === 1, { message: 'Ann sees Bob joining' });
    await h.sleep(500);
    assert.deepEqual(joining, [{ id: 2, name: 'Bob' }], 'one joining() for two tabs');

    for (const node of nodes) {
      const info = await h.sdkResult(h.sdk(node).get({ path: `/channels/${room}`, params: { info: 'user_count,subscription_count' } }));
      assert.deepEqual(info.json, { occupied: true, user_count: 2, subscription_count: 3 }, `counts on port ${node.port}: ${info.text}`);
      const users = await h.sdkResult(h.sdk(node).get({ path: `/channels/${room}/users` }));
      assert.deepEqual(users.json.users.map((u) => String(u.id)).sort(), ['1', '2'], `users on port ${node.port}: ${users.text}`);
    }
    bob1.disconnect();
    await h.sleep(800);
    assert.deepEqual(leaving, [], 'Bob still has a tab on C');
    bob2.leave(roomName);
    await h.eventually(() => leaving.length === 1, { message: 'Ann sees Bob leaving' });
    assert.deepEqual(leaving, [{ id: 2, name: 'Bob' }]);
    const info = await h.sdkResult(h.sdk(B).get({ path: `/channels/${room}`, params: { info: 'user_count,subscription_count' } }));
    assert.deepEqual(info.json, { occupied: true, user_count: 1, subscription_count: 1 }, info.text);
  });

  it('cache channel across nodes', async () => {
    const [A, B] = ctx.cluster.nodes;
    const name = h.uniq('cache-rc-');
    const first = await h.rawClient(B);
    await first.subscribe(name);
    await first.next('pusher:cache_miss');
    await h.sdk(A).trigger(name, 'Last', { v: 9 });
    await first.next('Last');
    const late = await h.rawClient(B);
    await late.subscribe(name);
    assert.deepEqual((await late.next('Last')).data, { v: 9 });
  });
});
