'use strict';
// Cluster mode, three nodes on one Redis: events, client events, socket_id exclusion, terminate,
// cache channels, Laravel's Redis broadcaster and the per-app connection quota, each with clients
// on different nodes from the publisher.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({
  nodes: 3,
  apps: [
    { id: 'app1' },
    { id: 'quota', max_connections: 3 },
    { id: 'lara', laravel_redis_prefix: 'laravel_database_' },
  ],
}, 'cluster-delivery');

const range = (n) => Array.from({ length: n }, (_, i) => i);

describe('cluster: delivery across nodes', () => {
  it('50 events triggered via node B reach subscribers on A and C exactly once, in publish order', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const name = h.uniq('orders-');
    const onA = h.pusherClient(A);
    const onC = h.pusherClient(C);
    const onC2 = h.pusherClient(C);
    const [chA, chC, chC2] = await Promise.all([h.subscribed(onA, name), h.subscribed(onC, name), h.subscribed(onC2, name)]);
    const got = [chA, chC, chC2].map((ch) => h.collect(ch, 'Numbered'));
    const sdkB = h.sdk(B);
    for (const n of range(50)) {
      const res = await h.sdkResult(sdkB.trigger(name, 'Numbered', { n }));
      assert.equal(res.status, 200, `trigger ${n} via B: ${res.text}`);
    }
    await h.eventually(() => got.every((g) => g.items.length >= 50), {
      timeout: 5000,
      message: `50 events on every subscriber (have ${got.map((g) => g.items.length).join('/')})`,
    });
    await h.sleep(300); // any duplicate would arrive by now
    for (const [i, g] of got.entries()) {
      assert.deepEqual(g.items.map((x) => x.data.n), range(50), `subscriber ${i}: order / duplicates`);
    }
  });

  it('batch_events via node A reach subscribers on B and C', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const c1 = h.uniq('batch1-');
    const c2 = h.uniq('batch2-');
    const onB = await h.rawClient(B);
    const onC = await h.rawClient(C);
    await onB.subscribe(c1);
    await onC.subscribe(c2);
    const res = await h.sdkResult(h.sdk(A).triggerBatch([
      { channel: c1, name: 'One', data: { b: 1 } },
      { channel: c2, name: 'Two', data: { b: 2 } },
    ]));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual((await onB.next('One')).data, { b: 1 });
    assert.deepEqual((await onC.next('Two')).data, { b: 2 });
    await onB.expectNone('Two', 200);
    await onC.expectNone('One', 0);
  });

  it('Echo whisper on a private channel crosses nodes and skips the sender', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const room = h.uniq('chat');
    const a = await h.echoClient(A);
    const b = await h.echoClient(B);
    const c = await h.echoClient(C);
    await Promise.all([a, b, c].map((e) => h.withTimeout(new Promise((r) => e.private(room).subscribed(r)), 5000, 'private subscribed')));
    const got = { a: [], b: [], c: [] };
    a.private(room).listenForWhisper('typing', (d) => got.a.push(d));
    b.private(room).listenForWhisper('typing', (d) => got.b.push(d));
    c.private(room).listenForWhisper('typing', (d) => got.c.push(d));
    a.private(room).whisper('typing', { who: 'a' });
    await h.eventually(() => got.b.length === 1 && got.c.length === 1, { message: `whisper on B and C (${JSON.stringify(got)})` });
    await h.sleep(400);
    assert.deepEqual(got, { a: [], b: [{ who: 'a' }], c: [{ who: 'a' }] });
  });

  it('a presence client event crosses nodes with the sender user_id', async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.app;
    const name = h.uniq('presence-ce-');
    const sender = await h.rawClient(A);
    const s = await sender.subscribe(name, h.rawAuth(app, sender.socketId, name, { user_id: 77 }));
    assert.equal(s.event, 'pusher_internal:subscription_succeeded', s.raw);
    const receiver = await h.rawClient(B);
    const r = await receiver.subscribe(name, h.rawAuth(app, receiver.socketId, name, { user_id: 'rx' }));
    assert.equal(r.event, 'pusher_internal:subscription_succeeded', r.raw);
    sender.send({ event: 'client-moved', channel: name, data: { x: 1 } });
    const f = await receiver.next('client-moved');
    assert.deepEqual(f.data, { x: 1 });
    assert.strictEqual(f.msg.user_id, 77, `frame on node B: ${f.raw}`);
    await sender.expectNone('client-moved', 300);
  });

  it('socket_id exclusion crosses nodes', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const name = h.uniq('excl-');
    const a = h.pusherClient(A);
    const b = h.pusherClient(B);
    const c = h.pusherClient(C);
    const [ca, cb, cc] = await Promise.all([a, b, c].map((x) => h.subscribed(x, name)));
    const seen = [ca, cb, cc].map((ch) => h.collect(ch, 'Saved'));
    // the excluded socket is on A, the trigger goes through C
    let res = await h.sdkResult(h.sdk(C).trigger(name, 'Saved', { n: 1 }, { socket_id: a.connection.socket_id }));
    assert.equal(res.status, 200, res.text);
    // the excluded socket is on B, the trigger goes through A
    res = await h.sdkResult(h.sdk(A).trigger(name, 'Saved', { n: 2 }, { socket_id: b.connection.socket_id }));
    assert.equal(res.status, 200, res.text);
    await h.eventually(() => seen[2].items.length === 2, { message: 'C gets both events' });
    await h.sleep(400);
    assert.deepEqual(seen.map((s) => s.items.map((x) => x.data.n)), [[2], [1], [1, 2]],
      'A must miss event 1 (its socket_id, triggered on C), B must miss event 2 (its socket_id, triggered on A)');
  });

  it('Echo toOthers-style exclusion on a private channel across nodes', async () => {
    const [A, B] = ctx.cluster.nodes;
    const room = h.uniq('doc');
    const a = await h.echoClient(A);
    const b = await h.echoClient(B);
    await Promise.all([a, b].map((e) => h.withTimeout(new Promise((r) => e.private(room).subscribed(r)), 5000, 'subscribed')));
    const gotA = [];
    const gotB = [];
    a.private(room).listen('.DocumentSaved', (d) => gotA.push(d));
    b.private(room).listen('.DocumentSaved', (d) => gotB.push(d));
    await h.sdk(B).trigger(`private-${room}`, 'DocumentSaved', { v: 2 }, { socket_id: a.socketId() });
    await h.eventually(() => gotB.length === 1, { message: 'B receives' });
    await h.sleep(400);
    assert.equal(gotA.length, 0, 'A (excluded, other node than the trigger) must not receive');
  });

  it('terminate_connections via node B closes the user\'s sockets on node A (and C), nobody else\'s', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const app = A.app;
    const userId = h.uniq('dave');
    const signedIn = async (node, id) => {
      const client = h.pusherClient(node, node.app, { userData: { id } });
      await h.connected(client);
      client.signin();
      await h.eventually(() => client.user.user_data && client.user.user_data.id === id, { message: `signin of ${id}` });
      return client;
    };
    const rawSignedIn = async (node, id) => {
      const c = await h.rawClient(node);
      c.send({ event: 'pusher:signin', data: h.rawSignin(app, c.socketId, { id }) });
      const ok = await c.next((f) => f.event === 'pusher:signin_success' || f.event === 'pusher:error', 3000, 'signin answer');
      assert.equal(ok.event, 'pusher:signin_success', ok.raw);
      return c;
    };
    const daveJs = await signedIn(A, userId);
    const daveRawA = await rawSignedIn(A, userId);
    const daveRawC = await rawSignedIn(C, userId);
    const erin = await signedIn(A, `${userId}-erin`);
    const erinChanges = [];
    erin.connection.bind('state_change', (s) => erinChanges.push(s.current));
    const daveDropped = new Promise((resolve) => {
      daveJs.connection.bind('state_change', ({ previous }) => { if (previous === 'connected') resolve(); });
    });
    const res = await h.sdkResult(h.sdk(B).terminateUserConnections(userId));
    assert.equal(res.status, 200, res.text);
    const closedA = await h.withTimeout(daveRawA.closed, 3000, 'raw socket of the user on A closed');
    assert.ok(closedA.code >= 4000 && closedA.code < 5000, `close code ${closedA.code}`);
    const closedC = await h.withTimeout(daveRawC.closed, 3000, 'raw socket of the user on C closed');
    assert.ok(closedC.code >= 4000 && closedC.code < 5000, `close code ${closedC.code}`);
    await h.withTimeout(daveDropped, 3000, 'pusher-js socket of the user on A dropped');
    await h.sleep(300);
    assert.deepEqual(erinChanges, [], 'another user on A must stay connected');
  });

  it('cache channel: cache_miss when empty; an event published via A reaches a late subscriber on B', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const name = h.uniq('cache-score-');
    const first = h.pusherClient(C);
    const ch1 = first.subscribe(name);
    await h.waitForEvent(ch1, 'pusher:cache_miss', { timeout: 5000 });
    const p1 = h.waitForEvent(ch1, 'Score');
    let res = await h.sdkResult(h.sdk(A).trigger(name, 'Score', { home: 1, away: 0 }));
    assert.equal(res.status, 200, res.text);
    res = await h.sdkResult(h.sdk(A).trigger(name, 'Score', { home: 2, away: 0 }));
    assert.equal(res.status, 200, res.text);
    await p1;

    const late = await h.rawClient(B);
    const sub = await late.subscribe(name);
    assert.equal(sub.event, 'pusher_internal:subscription_succeeded', sub.raw);
    const replay = await late.next('Score');
    assert.deepEqual(replay.data, { home: 2, away: 0 }, 'the last event is replayed');
    assert.equal(late.frames.indexOf(replay), late.frames.indexOf(sub) + 1, 'right after subscription_succeeded');
    await late.expectNone((f) => f.event === 'Score' || f.event === 'pusher:cache_miss', 300);

    // pusher-js on B too, for an event published before anyone on B subscribed
    const lateJs = h.pusherClient(B);
    assert.deepEqual(await h.waitForEvent(lateJs.subscribe(name), 'Score', { timeout: 5000 }), { home: 2, away: 0 });
  });

  it('cache channel: an event published via A before any subscriber exists is kept for a subscriber on C', async () => {
    const [A, , C] = ctx.cluster.nodes;
    const name = h.uniq('cache-early-');
    const res = await h.sdkResult(h.sdk(A).trigger(name, 'Early', { e: 1 }));
    assert.equal(res.status, 200, res.text);
    const c = await h.rawClient(C);
    await c.subscribe(name);
    assert.deepEqual((await c.next('Early')).data, { e: 1 });
  });

  it('per-app max_connections is cluster-wide: quota 3 over two nodes, the 4th gets 4004', async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.apps.quota;
    const gap = 1500; // the 1 s heartbeat exchanges per-node counts
    const open = [];
    open.push(await h.rawClient(A, app));
    await h.sleep(gap);
    open.push(await h.rawClient(B, app));
    await h.sleep(gap);
    open.push(await h.rawClient(A, app));
    await h.sleep(gap);
    const refusedOn = async (node, label) => {
      const c = new h.RawClient(node.wsUrl(app.key));
      const outcome = await h.withTimeout(Promise.race([
        c.closed.then((info) => ({ info })),
        c.next('pusher:connection_established', 5000).then((f) => ({ admitted: f }), () => new Promise(() => {})),
      ]), 5000, `4th connection on ${label} refused or admitted`);
      if (outcome.admitted) {
        c.close();
        assert.fail(`4th connection of app "quota" (max_connections 3, 3 already open: 2 on A, 1 on B) was ADMITTED on node ${label}: ${outcome.admitted.raw}`);
      }
      const err = c.frames.find((f) => f.event === 'pusher:error');
      return { info: outcome.info, err, frames: c.describe() };
    };
    for (const [node, label] of [[B, 'B'], [A, 'A']]) {
      const { info, err, frames } = await refusedOn(node, label);
      assert.equal(info.code, 4004, `connection over the cluster-wide quota on node ${label}: close ${info.code} ${info.reason}; frames ${frames}`);
      if (err) assert.equal(err.data.code, 4004, err.raw);
    }
    for (const c of open) assert.ok(c.isOpen, 'admitted connections stay open');
    // one leaves on A: after a heartbeat there is room on B again
    await open[0].close();
    await h.sleep(gap);
    const again = await h.rawClient(B, app);
    assert.ok(again.isOpen);
  });

  it('Laravel Redis broadcaster: PUBLISH laravel_database_private-orders reaches subscribers on every node', async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.apps.lara;
    const channel = 'private-orders';
    const echo = await h.echoClient(A, app);
    await h.withTimeout(new Promise((r) => echo.private('orders').subscribed(r)), 5000, 'Echo private(orders)');
    const viaEcho = [];
    echo.private('orders').listen('OrderShipped', (d) => viaEcho.push(d)); // namespace App.Events
    const raw = await h.rawClient(B, app);
    const s = await raw.subscribe(channel, h.rawAuth(app, raw.socketId, channel));
    assert.equal(s.event, 'pusher_internal:subscription_succeeded', s.raw);

    const payload = JSON.stringify({ event: 'App\\Events\\OrderShipped', data: { id: 1 }, socket: null });
    const receivers = await h.redisCommand(ctx.cluster.redis.port, 'PUBLISH', `laravel_database_${channel}`, payload);
    assert.ok(receivers >= 1, `PUBLISH reached ${receivers} Redis subscribers (nodes not subscribed to the Laravel channel?)`);
    const f = await raw.next('App\\Events\\OrderShipped');
    assert.equal(f.channel, channel);
    assert.equal(f.dataIsString, true, `data must be a JSON string as Pusher sends it: ${f.raw}`);
    assert.deepEqual(f.data, { id: 1 });
    await h.eventually(() => viaEcho.length === 1, { message: 'Echo listen(OrderShipped) on node A' });
    assert.deepEqual(viaEcho[0], { id: 1 });
  });

  it('Laravel Redis broadcaster: "socket" excludes that subscriber (toOthers), on any node', async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.apps.lara;
    const channel = `private-orders.${h.uniq('o')}`;
    const subs = [];
    for (const node of [A, A, B]) {
      const c = await h.rawClient(node, app);
      const s = await c.subscribe(channel, h.rawAuth(app, c.socketId, channel));
      assert.equal(s.event, 'pusher_internal:subscription_succeeded', s.raw);
      subs.push(c);
    }
    const [a1, a2, b1] = subs;
    const publish = (socket, id) => h.redisCommand(ctx.cluster.redis.port, 'PUBLISH', `laravel_database_${channel}`,
      JSON.stringify({ event: 'App\\Events\\OrderShipped', data: { id }, socket }));
    await publish(a1.socketId, 2);
    assert.deepEqual((await a2.next('App\\Events\\OrderShipped')).data, { id: 2 });
    assert.deepEqual((await b1.next('App\\Events\\OrderShipped')).data, { id: 2 });
    await a1.expectNone('App\\Events\\OrderShipped', 400);
    await publish(b1.socketId, 3);
    assert.deepEqual((await a1.next('App\\Events\\OrderShipped')).data, { id: 3 });
    assert.deepEqual((await a2.next('App\\Events\\OrderShipped')).data, { id: 3 });
    await b1.expectNone('App\\Events\\OrderShipped', 400);
  });
});
