'use strict';
// Cluster mode: Redis dies and comes back on the same port. Sockets stay open, publishes fail fast
// with 503, the node reports not-ready; afterwards subscriptions and presence come back by
// themselves and nothing acknowledged before the crash was lost.
const { describe, it, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

let cluster;
after(async () => {
  await h.cleanupClients();
  if (cluster) { await cluster.stop(); cluster.saveLogs('cluster-redis-restart'); }
});

const { readyz } = h;

/** Counts transitions into 'connected' after the first one (a reconnect shows as one more). */
function watchReconnects(client) {
  const states = [];
  client.connection.bind('state_change', ({ current }) => states.push(current));
  return { states, reconnects: () => states.filter((s) => s === 'connected').length };
}

describe('cluster: Redis restart', () => {
  it('sockets stay open, 503 while Redis is down, everything restored after restart', async () => {
    cluster = await h.startCluster({ nodes: 2, apps: [{ id: 'app1' }] });
    const { redis } = cluster;
    const [A, B] = cluster.nodes;
    const app = A.app;
    const chan = h.uniq('feed-');
    const room = h.uniq('presence-room-');

    // subscribers: pusher-js on both nodes, presence members on both nodes
    const subA = h.pusherClient(A);
    const subB = h.pusherClient(B);
    const [chA, chB] = await Promise.all([h.subscribed(subA, chan), h.subscribed(subB, chan)]);
    const gotA = h.collect(chA, 'Seq');
    const gotB = h.collect(chB, 'Seq');
    const memA = h.pusherClient(A, app, { user: { user_id: 'ann', user_info: { name: 'Ann' } } });
    const pmA = await h.subscribed(memA, room);
    const memB = h.pusherClient(B, app, { user: { user_id: 'bob', user_info: { name: 'Bob' } } });
    await h.subscribed(memB, room);
    await h.eventually(() => pmA.members.count === 2, { message: 'Ann sees Bob' });
    const removedSeen = h.collect(pmA, 'pusher:member_removed');
    const raw = await h.rawClient(B);
    await raw.subscribe(chan);
    const watchers = [subA, subB, memA, memB].map(watchReconnects);

    // a sequential publisher through A, running across the crash
    const sdkA = h.sdk(A, app, { timeout: 5000 });
    const log = []; // { n, status, doneAt, ms }
    let killedAt = null;
    let stopPublishing = false;
    const publisher = (async () => {
      for (let n = 0; !stopPublishing && n < 10000; n++) {
        const t0 = Date.now();
        const res = await h.sdkResult(sdkA.trigger(chan, 'Seq', { n })).catch((e) => ({ status: `error ${e.message}` }));
        log.push({ n, status: res.status, doneAt: Date.now(), ms: Date.now() - t0 });
        await h.sleep(20);
      }
    })();
    await h.eventually(() => log.filter((x) => x.status === 200).length >= 10, { timeout: 5000, message: '10 publishes before the crash' });

    assert.equal(await readyz(A), 200, 'A ready before the crash');
    killedAt = Date.now();
    await redis.kill();

    // Redis down: not ready, publishes 503 fast, sockets open
    await h.eventually(async () => (await readyz(A)) === 503 && (await readyz(B)) === 503, {
      timeout: 5000, interval: 100, message: '/readyz 503 on both nodes while Redis is down',
    });
    const t0 = Date.now();
    const down = await h.sdkResult(h.sdk(B, app, { timeout: 10000 }).trigger(chan, 'Seq', { n: -1 }))
      .catch((e) => ({ status: `error ${e.message}` }));
    const took = Date.now() - t0;
    assert.equal(down.status, 503, `trigger via B while Redis is down: ${JSON.stringify(down)}`);
    assert.ok(took < 3000, `503 took ${took} ms (should be fast)`);
    await h.eventually(() => log.filter((x) => x.doneAt > killedAt + 1500).length >= 3, {
      timeout: 8000, message: `the publisher through A keeps getting answers while Redis is down; last: ${JSON.stringify(log.slice(-3))}`,
    }).catch((e) => { throw new Error(`${e.message}; publisher log tail: ${JSON.stringify(log.slice(-5))}`); });
    const during = log.filter((x) => x.doneAt > killedAt + 1500);
    assert.ok(during.every((x) => x.status === 503), `publishes while Redis was down: ${JSON.stringify(during.slice(0, 5))}`);
    assert.ok(during.every((x) => x.ms < 3000), `slow answers while Redis was down: ${JSON.stringify(during.filter((x) => x.ms >= 3000).slice(0, 5))}`);
    await raw.ping();
    for (const c of [subA, subB, memA, memB]) assert.equal(c.connection.state, 'connected');

    // Redis back on the same port
    const restartedAt = Date.now();
    await redis.start();
    await h.eventually(async () => (await readyz(A)) === 200 && (await readyz(B)) === 200, {
      timeout: 10000, interval: 100, message: '/readyz 200 on both nodes after Redis is back',
    });
    console.log(`redis restart: nodes ready ${Date.now() - restartedAt} ms after redis-server started`);
    stopPublishing = true;
    await publisher;

    // every publish acknowledged before the kill was delivered, once, in order, on both nodes
    const acked = log.filter((x) => x.status === 200 && x.doneAt < killedAt).map((x) => x.n);
    const statuses = {};
    for (const x of log) statuses[x.status] = (statuses[x.status] || 0) + 1;
    console.log(`redis restart: ${acked.length} publishes acknowledged before the kill; all answers: ${JSON.stringify(statuses)}; 503 via B took ${took} ms`);
    const seqA = gotA.items.map((x) => x.data.n);
    const seqB = gotB.items.map((x) => x.data.n);
    for (const [label, seq] of [['A', seqA], ['B', seqB]]) {
      const missing = acked.filter((n) => !seq.includes(n));
      assert.deepEqual(missing, [], `node ${label}: publishes answered 200 before the kill but never delivered`);
      const ackedSeen = seq.filter((n) => acked.includes(n));
      assert.deepEqual(ackedSeen, acked, `node ${label}: order/duplicates of acknowledged publishes`);
    }

    // delivery resumes on the existing subscriptions
    const pA = h.waitForEvent(chA, 'After', { timeout: 5000 });
    const pB = h.waitForEvent(chB, 'After', { timeout: 5000 });
    const res = await h.sdkResult(h.sdk(B).trigger(chan, 'After', { ok: true }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(await pA, { ok: true }, 'subscriber on A after the restart');
    assert.deepEqual(await pB, { ok: true }, 'subscriber on B after the restart');
    assert.deepEqual((await raw.next('After', 3000)).data, { ok: true });

    // presence and counts restored
    for (const node of [A, B]) {
      await h.eventually(async () => {
        const users = await h.sdkResult(h.sdk(node).get({ path: `/channels/${room}/users` }));
        const ids = users.json && users.json.users ? users.json.users.map((u) => u.id).sort() : users.text;
        return JSON.stringify(ids) === JSON.stringify(['ann', 'bob']) || (() => { throw new Error(`users: ${JSON.stringify(ids)}`); })();
      }, { timeout: 5000, message: `GET /channels/${room}/users on port ${node.port} lists ann and bob again` });
      const info = await h.sdkResult(h.sdk(node).get({ path: `/channels/${room}`, params: { info: 'user_count,subscription_count' } }));
      assert.deepEqual(info.json, { occupied: true, user_count: 2, subscription_count: 2 }, `presence counts on port ${node.port}`);
      const cinfo = await h.sdkResult(h.sdk(node).get({ path: `/channels/${chan}`, params: { info: 'subscription_count' } }));
      assert.deepEqual(cinfo.json, { occupied: true, subscription_count: 3 }, `public channel counts on port ${node.port}`);
    }
    // a new member after the restart is announced to an old one
    const pAdded = h.waitForEvent(pmA, 'pusher:member_added', { timeout: 5000 });
    const memC = h.pusherClient(B, app, { user: { user_id: 'cy', user_info: { name: 'Cy' } } });
    const pmC = await h.subscribed(memC, room);
    assert.deepEqual((await pAdded).id, 'cy');
    assert.equal(pmC.members.count, 3, 'the newcomer sees ann, bob and itself');

    // no client reconnected, nobody was announced as gone
    watchers.forEach((w, i) => assert.equal(w.reconnects(), 0, `client ${i} changed state: ${JSON.stringify(w.states)}`));
    assert.deepEqual(removedSeen.items.map((x) => x.data), [], 'no member_removed for members that never left');
  });
});
