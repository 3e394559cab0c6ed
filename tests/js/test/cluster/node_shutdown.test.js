'use strict';
// Cluster mode: SIGTERM of a node behind a load balancer. Readiness fails, clients are closed with
// 4200, pusher-js reconnects through the balancer to the other node and keeps receiving; the
// node's presence members are removed at once (not after the presence TTL).
const { describe, it, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

let cluster;
after(async () => {
  await h.cleanupClients();
  if (cluster) { await cluster.stop(); cluster.saveLogs('cluster-node-shutdown'); }
});

describe('cluster: SIGTERM of a node', () => {
  it('pusher-js clients get 4200, reconnect via the balancer to node B and receive an event triggered via B', async () => {
    // presence TTL far above the test's waits: a removal must come from the draining node itself
    cluster = await h.startCluster({ nodes: 2, presenceTtl: 30, apps: [{ id: 'app1' }], node: { shutdown_grace_secs: 4 } });
    const [A, B] = cluster.nodes;
    const app = A.app;
    const proxy = await h.startProxy([A, B]);
    const chan = h.uniq('live-');
    const room = h.uniq('presence-drain-');

    const clients = [0, 1, 2].map(() => h.pusherClient(proxy, app));
    const errors = clients.map(() => []);
    clients.forEach((c, i) => c.connection.bind('error', (e) => errors[i].push(e && e.data ? e.data.code : e && e.type)));
    const channels = await Promise.all(clients.map((c) => h.subscribed(c, chan)));
    const firstIds = clients.map((c) => c.connection.socket_id);
    assert.ok(proxy.routed.every((p) => p === A.port), `all first connections went to A: ${proxy.routed}`);
    const rawViaProxy = new h.RawClient(proxy.wsUrl(app.key));
    await rawViaProxy.established();
    await rawViaProxy.subscribe(chan);

    // presence: a member connected straight to A (it will not come back), watched from B
    const observer = await h.rawClient(B);
    await observer.subscribe(room, h.rawAuth(app, observer.socketId, room, { user_id: 'watcher' }));
    const leaver = await h.rawClient(A);
    const ls = await leaver.subscribe(room, h.rawAuth(app, leaver.socketId, room, { user_id: 'leaver' }));
    assert.equal(ls.event, 'pusher_internal:subscription_succeeded', ls.raw);
    await observer.next('pusher_internal:member_added');

    const exited = new Promise((resolve) => A.child.once('exit', (code, signal) => resolve({ code, signal, at: Date.now() })));
    const termAt = Date.now();
    A.child.kill('SIGTERM');

    await h.eventually(async () => {
      try { return (await fetch(A.metricsUrl('/readyz'), { signal: AbortSignal.timeout(500) })).status === 503; } catch { return true; }
    }, { timeout: 2000, interval: 50, message: 'A fails readiness right after SIGTERM' });

    const closeInfo = await h.withTimeout(rawViaProxy.closed, 5000, 'raw client through the balancer closed');
    assert.equal(closeInfo.code, 4200, `close code ${closeInfo.code} ${closeInfo.reason}`);

    const removed = await observer.next('pusher_internal:member_removed', 5000);
    assert.deepEqual(removed.data, { user_id: 'leaver' });
    console.log(`SIGTERM of node A -> member_removed on B after ${removed.at - termAt} ms (presence TTL 30 s)`);

    // every pusher-js client saw 4200, reconnected (new socket id) and resubscribed
    await h.eventually(() => clients.every((c, i) => c.connection.state === 'connected' && c.connection.socket_id !== firstIds[i] && channels[i].subscribed), {
      timeout: 8000, message: `pusher-js clients reconnected and resubscribed (states ${clients.map((c) => c.connection.state)})`,
    });
    errors.forEach((e, i) => assert.ok(e.includes(4200), `client ${i} errors: ${JSON.stringify(e)}`));
    const afterRouting = proxy.routed.slice(4);
    assert.ok(afterRouting.length >= 3 && afterRouting.every((p) => p === B.port), `reconnections routed to B: ${proxy.routed}`);

    const got = channels.map((ch) => h.waitForEvent(ch, 'AfterDrain', { timeout: 5000 }));
    const res = await h.sdkResult(h.sdk(B).trigger(chan, 'AfterDrain', { via: 'B' }));
    assert.equal(res.status, 200, res.text);
    for (const p of got) assert.deepEqual(await p, { via: 'B' });

    const ex = await h.withTimeout(exited, 6000, 'node A exits within shutdown_grace_secs');
    assert.equal(ex.code, 0, `exit ${JSON.stringify(ex)}`);
    assert.ok(ex.at - termAt <= 5000, `exited ${ex.at - termAt} ms after SIGTERM (grace 4 s)`);

    // counts on B: the three reconnected clients, nobody left on A
    const info = await h.sdkResult(h.sdk(B).get({ path: `/channels/${chan}`, params: { info: 'subscription_count' } }));
    assert.deepEqual(info.json, { occupied: true, subscription_count: 3 }, info.text);
    const pinfo = await h.sdkResult(h.sdk(B).get({ path: `/channels/${room}`, params: { info: 'user_count,subscription_count' } }));
    assert.deepEqual(pinfo.json, { occupied: true, user_count: 1, subscription_count: 1 }, pinfo.text);
  });
});
